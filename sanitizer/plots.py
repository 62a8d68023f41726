"""`--plots DIR`: the figures a reviewer asks for, as PNG files written atomically.

pruning_curve.png  held-out agreement (and probe flip rate, and ASR when --eval-triggered is given)
                   against units pruned, from the plan's trace
linf_hist.png      per-image ℓ∞ of the top suspect units on clean vs probed images
                   (computed by defense.rank.linf_histograms: this module only draws arrays)
probes.png         the probes (synthesized triggers, or the user's suspicious samples) on a clean image
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .atomic import check_writable, write_bytes
from .errors import BadOutput, require

FILES = ("pruning_curve.png", "linf_hist.png", "probes.png")


def check(folder: Path, force: bool, inputs: tuple[Path, ...]) -> None:
    """Before any work: matplotlib is there, the folder may be created, and no figure replaces an input or,
    without --force, an existing file."""
    require("matplotlib", "plots")
    if folder.exists() and not folder.is_dir():
        raise BadOutput(f"--plots {folder} exists and is not a folder")
    if folder.is_dir():
        for name in FILES:
            check_writable(folder / name, force=force, inputs=inputs)
    elif not folder.parent.is_dir():
        raise BadOutput(f"--plots {folder}: folder {folder.parent} does not exist")


def _png(plt, fig) -> bytes:
    """Render to memory and release the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _to_image(x: np.ndarray, hi: float) -> np.ndarray:
    img = np.clip(x / hi, 0, 1)
    return img[..., 0] if img.shape[-1] == 1 else img


def write(folder: Path, pngs: dict[str, bytes]) -> list[Path]:
    """Write the figures `render` made into `folder`, each atomically; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in pngs.items():
        write_bytes(folder / name, data)
        written.append(folder / name)
    return written


def render(report: dict, figures: dict, asr_curve: dict[int, float] | None) -> dict[str, bytes]:
    """The figures as PNG bytes by file name (FILES; the histograms and probes only when `figures` has them).

    `figures`: trace-free data the report does not carry (per-image ℓ∞ arrays, probe images).
    Raises SanitizeError (exit 9) without matplotlib."""
    require("matplotlib", "plots")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    pngs = {}

    trace = [t for t in report["plan"]["trace"] if "final" not in t and "agreement" in t]
    units = [t["units"] for t in trace]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(units, [t["agreement"] for t in trace], "o-", label="held-out agreement")
    read = [t for t in trace if "probe_flip" in t]   # a count one probe over its bar decided has no other rate
    if read:
        ax.plot([t["units"] for t in read], [max(t["probe_flip"]) for t in read], "s--", label="worst probe flip rate")
    if asr_curve:
        ks = sorted(asr_curve)
        ax.plot(ks, [asr_curve[k] for k in ks], "^:", label="ASR (--eval-triggered)")
    ax.axvline(report["plan"]["count"], color="grey", lw=0.8, label=f"chosen: {report['plan']['count']}")
    if units and max(units) > 8:
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("units pruned")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"pruning curve ({report['criterion']})")
    pngs[FILES[0]] = _png(plt, fig)

    def row(n: int, width: float, height: float):
        fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
        return fig, axes[0]

    hist = figures.get("linf")
    if hist:
        fig, axes = row(len(hist), 3, 2.8)
        for ax, (label, clean, probed) in zip(axes, hist):
            bins = np.linspace(min(clean.min(), probed.min()), max(clean.max(), probed.max()) + 1e-9, 30)
            ax.hist(clean, bins=bins, alpha=0.6, label="clean")
            ax.hist(probed, bins=bins, alpha=0.6, label="probe")
            ax.set_title(label, fontsize=7)
            ax.set_xlabel("ℓ∞ per image", fontsize=7)
        axes[0].legend(fontsize=7)
        pngs[FILES[1]] = _png(plt, fig)

    images = figures.get("probe_images")
    if images:
        fig, axes = row(len(images), 2, 2.4)
        for ax, (label, img) in zip(axes, images):
            ax.imshow(_to_image(img, figures["hi"]), cmap="gray" if img.shape[-1] == 1 else None,
                      interpolation="nearest")
            ax.set_title(label, fontsize=7)
            ax.axis("off")
        pngs[FILES[2]] = _png(plt, fig)
    return pngs
