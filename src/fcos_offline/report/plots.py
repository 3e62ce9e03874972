"""Report plots (matplotlib, headless): PR curves, per-class AP, speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(pr_curves_json: str | Path, out_png: str | Path, title: str) -> Path:
    """Precision-recall curves at IoU 0.5 (one line per class plus their mean) from ``pr_curves.json``."""
    data: dict[str, Any] = json.loads(Path(pr_curves_json).read_text())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    recall = data.get("recall", [])
    curves = []
    for curve in data.get("classes", []):
        precision = [float("nan") if p is None else p for p in curve.get("iou50", [])]
        if precision:
            curves.append(precision)
            ax.plot(recall, precision, lw=1, alpha=0.6, label=str(curve.get("name", curve.get("category_id"))))
    if curves:
        import warnings

        import numpy as np

        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" where no class has a curve
            mean = np.nanmean(np.asarray(curves, dtype=float), axis=0) if len(curves) > 1 else curves[0]
        ax.plot(recall, mean, "k", lw=2.5, label="mean over classes")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    _, labels = ax.get_legend_handles_labels()
    if len(labels) <= 16:
        ax.legend(fontsize=7, loc="lower left")
    out = Path(out_png)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_classwise_ap(classwise: list[dict[str, Any]], out_png: str | Path, title: str) -> Path:
    """Horizontal bars of AP@[.5:.95] per class (from a summary's ``classwise`` list)."""
    plt = _pyplot()
    rows = [(str(c.get("name", c.get("category_id"))), c.get("AP")) for c in classwise]
    rows = [(n, ap if ap is not None else 0.0) for n, ap in rows]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="#3a7bd5")
    ax.set(xlabel="AP@[.5:.95]", xlim=(0, 1), title=title)
    ax.grid(axis="x", alpha=0.3)
    out = Path(out_png)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_speed(entries: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Throughput per configuration (img/s): the engine alone and end to end, side by side."""
    import numpy as np

    plt = _pyplot()
    names = [f"{e['mode']} {e['engine']} {e['precision']} bs{e['batch_size']}" for e in entries][::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.6 * len(names) + 1)))
    y = np.arange(len(names))
    ax.barh(y + 0.2, [e["engine_img_per_s"] for e in entries][::-1], height=0.4, color="#009e73", label="engine (inside the engine call)")
    ax.barh(y - 0.2, [e["e2e_img_per_s"] for e in entries][::-1], height=0.4, color="#0072b2", label="end to end (files in, dumps out)")
    ax.set_yticks(y, names)
    ax.legend(loc="lower right", fontsize=8)
    ax.set(xlabel="images / s", title="throughput")
    ax.grid(axis="x", alpha=0.3)
    out = Path(out_png)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
