"""Reports of a grid: ``report.md`` + ``report.html`` (figures embedded) + ``figures/*.png``.

Called at the end of ``bench run`` and by ``bench report``. Reads only the store.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from bench import store
from bench.runner import grid_cells
from tricks.registry import REGISTRY

__all__ = ["arm_color", "learning_curve_figure", "write_report"]

_PALETTE = plt.get_cmap("tab20").colors


def arm_color(arm: str) -> tuple[float, ...]:
    """A consistent colour per arm: black for the reference arm, the trick's colour otherwise."""
    if arm in ("baseline", "all"):
        return (0.0, 0.0, 0.0)
    names = list(REGISTRY)
    key = arm.lstrip("+").removeprefix("all-").split("+")[0]
    idx = names.index(key) if key in names else hash(arm) % len(_PALETTE)
    return (
        _PALETTE[(idx * 2) % len(_PALETTE)]
        if arm.startswith(("+", "all-")) or "+" not in arm
        else _PALETTE[(idx * 2 + 1) % len(_PALETTE)]
    )


def _fmt(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "—"
    digits = 4 if abs(mean) < 1 else 2
    return f"{mean:.{digits}g} ± {std:.2g}" if math.isfinite(std) else f"{mean:.{digits}g}"


def learning_curve_figure(curves: pd.DataFrame, task: str, metric: str, path: Path, unit: str = "") -> None:
    """One line per arm (mean over seeds) with a band from the min to the max seed."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, df in curves.groupby("arm", sort=False):
        if metric not in df:
            continue
        agg = df.groupby("samples")[metric].agg(["mean", "min", "max"])
        ax.plot(agg.index, agg["mean"], label=arm, color=arm_color(arm), lw=1.6)
        ax.fill_between(agg.index, agg["min"], agg["max"], color=arm_color(arm), alpha=0.15, lw=0)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"{metric}{f' ({unit})' if unit else ''}")
    ax.set_title(f"{task}: {metric} by samples (line: mean over seeds, band: seed range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(gdir: Path) -> Path:
    """Write the report of grid folder ``gdir``; returns the path of ``report.md``."""
    gdir = Path(gdir)
    spec, cells = grid_cells(gdir)
    ids = {c.run_id for c in cells}
    runs = store.load_grid(gdir)
    runs = runs[runs["run_id"].isin(ids)] if len(runs) else runs
    curves = store.load_curves(gdir)
    curves = curves[curves["run_id"].isin(ids)] if len(curves) else curves
    figdir = gdir / "figures"
    figdir.mkdir(exist_ok=True)
    md = [
        f"# trickbench report: {spec.grid}",
        "",
        spec.description,
        "",
        f"design: `{spec.design}`, seeds: {len(spec.seeds)}, runs: {len(cells)}",
        "",
    ]
    figures: list[tuple[str, Path]] = []
    for task in spec.tasks:
        label = task.label
        tr = runs[runs["task"] == label] if len(runs) else runs
        md += [f"## {label}", ""]
        if not len(tr):
            md += ["(no runs stored yet)", ""]
            continue
        from experiments.registry import get_task

        metric = get_task(task.task).metric
        cols = [c for c in tr.columns if c.startswith("metric.") and not c.startswith("metric.raw_")]
        header = ["arm", "n", *[c.removeprefix("metric.") for c in cols], "diverged", "train s/run"]
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm, df in tr.groupby("arm", sort=False):
            done = df[df["status"].isin(store.RunStatus.FINISHED)]
            vals = [_fmt(done[c].mean(), done[c].std()) if len(done) else "—" for c in cols]
            div = int((df["status"] == store.RunStatus.DIVERGED).sum())
            cost = done["cost.train_s"].mean() if "cost.train_s" in done and len(done) else float("nan")
            md.append(f"| {arm} | {len(done)} | " + " | ".join(vals) + f" | {div} | {cost:.1f} |")
        md += ["", f"mean ± std over seeds; n = finished runs; primary metric `{metric}`.", ""]
        tc = curves[curves["task"] == label] if len(curves) else curves
        if len(tc) and metric in tc:
            path = figdir / f"{label}_learning_curves.png"
            learning_curve_figure(tc, label, metric, path)
            figures.append((f"{label}: learning curves", path))
            md += [f"![{label} learning curves](figures/{path.name})", ""]
    (gdir / "report.md").write_text("\n".join(md) + "\n")
    _write_html(gdir, md, figures)
    return gdir / "report.md"


def _write_html(gdir: Path, md: list[str], figures: list[tuple[str, Path]]) -> None:
    """A self-contained HTML page: the markdown text pre-formatted, figures inlined as base64."""
    body = [f"<pre>{html.escape(chr(10).join(line for line in md if not line.startswith('![')))}</pre>"]
    for title, path in figures:
        b64 = base64.b64encode(path.read_bytes()).decode()
        body.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>")
    (gdir / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>trickbench report</title>"
        "<body style='font-family:sans-serif;max-width:1000px;margin:auto'>" + "\n".join(body) + "</body>"
    )
