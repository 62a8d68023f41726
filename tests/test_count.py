"""The count search reads a pruned model's probes lazily and shares counts between rankings: its decisions and the
rates it reports must be those of reading every probe at every count (a brute-force table)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from digits_backdoor import PP, TARGET, trained  # noqa: E402
from sanitizer import rewrite  # noqa: E402
from sanitizer.defense import Context  # noqa: E402
from sanitizer.defense.count import ALIVE, MAX_SHARE, Checks, bars, count_by_probes, flips  # noqa: E402
from sanitizer.defense.probes import synthesize  # noqa: E402
from sanitizer.defense.rank import margin_gradients  # noqa: E402
from sanitizer.pipeline import HeldOut, Options, prepare, split  # noqa: E402
from sanitizer.plan import Plan, rank, safe_limit  # noqa: E402


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("count")
    model, calib, _, _ = trained(poisoned=True)
    onnx.save(model, tmp / "m.onnx")
    np.savez(tmp / "calib.npz", X=calib.astype(np.uint8))
    opts = Options(model=tmp / "m.onnx", calib=tmp / "calib.npz", scale=1 / 255, layout="nchw")
    prep = prepare(opts)
    fit, hold = split(prep.calib.n, opts.holdout, opts.seed)
    held = HeldOut(prep, hold, opts.batch_size)
    fit_raw, hold_raw = prep.calib.subset(fit).read(0, len(fit)), prep.calib.subset(hold).read(0, len(hold))
    ctx = Context(prep, opts, lambda *a: None, TARGET, fit_raw, hold_raw, held, held.inputs())
    probes = synthesize(prep.model, fit_raw, PP, TARGET, steps=30, spec=prep.spec)
    probed_x = [PP.apply(p.apply(hold_raw)) for p in probes]
    sites = [s for s in prep.sites.values() if s.prunable]
    gap = margin_gradients(prep.model, sites, PP, [p.apply(fit_raw) for p in probes], fit_raw, TARGET, 64,
                           spec=prep.spec)
    order = rank(gap, descending=True)
    limit = safe_limit(order, {s.name: s.channels for s in sites})
    return ctx, probed_x, order, limit


def _table(ctx, probed_x, order, cap):
    """Every count's agreement and every probe's flip rate, read eagerly with count.flips."""
    plan, table = Plan(order), {}
    for k in range(cap + 1):
        model = rewrite.apply(ctx.prep.model, ctx.prep.sites, plan.pruned(k))
        base, rates = flips(model, ctx.prep.spec, ctx.clean_x, probed_x, TARGET, 64)
        table[k] = (ctx.held.agreement_of(base).rate, np.array(rates))
    return table


def _reference(table, cap):
    """count_by_probes' rule on the table: the doubling grid while alive, the bars from its floors, the first
    grid count within them (or the nearest miss), then bisection below it. Returns the count and the counts read."""
    if table[0][1].max() <= 0.05:
        return 0, {0}
    grid, k = [0], 1
    visited = {0, 1}
    while table[k][0] >= ALIVE:
        grid.append(k)
        if k >= cap:
            break
        k = min(2 * k, cap)
        visited.add(k)
    good = bars(np.min([table[k][1] for k in grid], axis=0))
    ok = [k for k in grid if (table[k][1] <= good).all()]
    hi = ok[0] if ok else min(grid, key=lambda k: (table[k][1] - good).max())
    lo = max([k for k in grid if k < hi], default=0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        visited.add(mid)
        hi, lo = (mid, lo) if (table[mid][1] <= good).all() else (hi, mid)
    return hi, visited


def test_lazy_reads_decide_as_reading_every_rate(search):
    ctx, probed_x, order, limit = search
    cap = min(limit, max(1, int(MAX_SHARE * len(order))))
    table = _table(ctx, probed_x, order, cap)
    plan, agreement, good = count_by_probes(ctx, Checks(ctx, ctx.prep.model, probed_x, True), order, limit)
    count, visited = _reference(table, cap)
    assert plan.count == count and plan.count > 0
    assert {t["units"] for t in plan.trace} == visited
    assert agreement == table[plan.count][0]
    skipped = 0
    for t in plan.trace:
        rate, rates = table[t["units"]]
        assert t["agreement"] == round(rate, 6)
        if "probe_flip" in t:
            assert t["probe_flip"] == [round(r, 4) for r in rates]
        else:
            # a count one probe over its bar decided (or a broken model past the grid) reports no other rate
            skipped += 1
            over = t.get("probe_over_bar")
            assert over is not None or rate < ALIVE
            if over is not None:
                assert over["flip"] == round(rates[over["probe"]], 4) and rates[over["probe"]] > good[over["probe"]]
    assert skipped, "no count was decided before reading every probe: the test shows nothing lazy"


def test_rankings_share_the_counts_they_have_in_common(search):
    ctx, probed_x, order, limit = search
    checks = Checks(ctx, ctx.prep.model, probed_x, True)
    first = count_by_probes(ctx, checks, order, limit)
    read = len(checks)
    # a ranking that agrees with the first reads no model again, and finds what it found
    again = count_by_probes(ctx, checks, list(order), limit)
    assert len(checks) == read
    assert again[0].count == first[0].count and again[0].trace == first[0].trace
    # one whose first two units come in the other order prunes the same units at every count but one: only
    # the sets of units it prunes that were not read before are read
    swapped = [order[1], order[0], *order[2:]]
    known = {frozenset(order[:t["units"]]) for t in first[0].trace}
    third = count_by_probes(ctx, checks, swapped, limit)
    new = {frozenset(swapped[:t["units"]]) for t in third[0].trace} - known
    assert new and len(checks) == read + len(new)


def test_no_count_past_a_limit_of_zero_is_read(search):
    ctx, probed_x, order, _ = search
    # plan.safe_limit is 0 when the first unit is its layer's last: pruning it would cut the network
    plan, agreement, _ = count_by_probes(ctx, Checks(ctx, ctx.prep.model, probed_x, True), order, 0)
    assert plan.count == 0 and agreement == 1.0 and {t["units"] for t in plan.trace} == {0}
