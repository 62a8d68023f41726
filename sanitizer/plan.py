"""The plan is data: an ordered list of units and how many of them to prune; printable and re-appliable."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Plan:
    order: list[tuple[str, int]]            # (site, channel), first pruned first
    count: int = 0
    trace: list[dict] = field(default_factory=list)   # every evaluated count: the pruning curve

    def pruned(self, count: int | None = None) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for site, ch in self.order[: self.count if count is None else count]:
            out.setdefault(site, []).append(int(ch))
        return {k: sorted(v) for k, v in out.items()}

    def to_dict(self) -> dict:
        return {"count": self.count, "candidates": len(self.order), "pruned": self.pruned(), "trace": self.trace}


def rank(scores: dict[str, np.ndarray], *, descending: bool = False) -> list[tuple[str, int]]:
    """Joint order over sites; ties broken by site then channel so the plan is deterministic."""
    flat = [(float(v), site, c) for site, arr in scores.items() for c, v in enumerate(arr)]
    flat.sort(key=lambda t: ((-t[0] if descending else t[0]), t[1], t[2]))
    return [(site, c) for _, site, c in flat]


def safe_limit(order: list[tuple[str, int]], channels: dict[str, int]) -> int:
    """How far down `order` pruning may go without emptying a whole layer, which would cut the network."""
    per_site: dict[str, int] = {}
    for i, (site, _) in enumerate(order):
        per_site[site] = per_site.get(site, 0) + 1
        if per_site[site] >= channels[site]:
            return i
    return len(order)


def largest_ok(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest k in [lo, hi] with ok(k), assuming ok(lo) holds and ok is monotone: bisection, ~log2 calls."""
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
