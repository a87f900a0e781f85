"""Figures of a grid report, one function per figure.

Called by ``bench/report.py``; inputs are the frames of ``bench.store`` and the
:class:`bench.stats.TaskStats` of a task. Each function writes ``<name>.png`` (with its title,
for the HTML page), ``<name>.svg`` (vector, without the title: for a paper, captioned there)
and ``<name>.json``: the numbers every panel draws, one row per line or interval
(:func:`empty_panels` reads it back; a test checks that no panel of a report is empty). A
panel without data is not drawn. Returns the PNG's path, or None when the figure would have no
panel at all.

Every trick has one colour in every figure of a report (:func:`set_trick_order`: its place in
the grid's trick list); the reference arm is black. Nothing here imports torch or a registry:
a finished grid's report draws without them.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from bench.stats import MIN_EFFECT_SIZE, MIN_RELIABLE_CI_SEEDS, TaskStats

__all__ = [
    "FIGURE_FORMATS",
    "VERDICT_COLORS",
    "arm_color",
    "cost_chart",
    "effect_gain",
    "empty_panels",
    "forest_plot",
    "interaction_heatmap",
    "learning_curves",
    "outputs_figures",
    "overview_figure",
    "ratio_ticks",
    "set_trick_order",
    "stability_chart",
    "trick_color",
]

DPI = 110
#: the PNG has the title (the HTML page embeds it); the SVG is for papers (no title: the caption says it). A PDF
#: costs 5–10× an SVG to write (TrueType subsetting); add "pdf" here, or convert the SVG, when a venue wants one
FIGURE_FORMATS = ("png", "svg")
MAX_FOREST_COLUMNS = 3  # forest panels per row
OUTPUT_ARMS_PER_PAGE = 8  # arms per outputs figure; more arms make more pages
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in the SVG (small, searchable, editable)
matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType in a PDF (editable in a paper's figure tools)

#: the colour of each verdict class (bench.stats.verdict_class) in every figure and in the HTML page
VERDICT_COLORS = {
    "helps": "#1a7f37",
    "hurts": "#cf222e",
    "no effect": "#0969da",
    "unclear": "#bf8700",
    "too few seeds": "#6e7781",
    "no data": "#afb8c1",
}
# 20 distinguishable colours: tab10, then the dark halves of tab20b/tab20c hues (no greys: grey means "other")
_PALETTE: tuple[tuple[float, ...], ...] = (
    tuple(plt.get_cmap("tab10").colors[:7])
    + tuple(plt.get_cmap("tab10").colors[8:])
    + tuple(plt.get_cmap("tab20b").colors[i] for i in (0, 4, 8, 12, 16))
    + tuple(plt.get_cmap("Dark2").colors[i] for i in (0, 1, 2, 3, 5, 6))
)
REFERENCE_COLOR = (0.0, 0.0, 0.0)
_TRICK_ORDER: list[str] = []


def set_trick_order(tricks: Sequence[str]) -> None:
    """Fix the colour of each trick for the figures that follow: the i-th trick gets the i-th colour.

    Called once per report with every trick of the grid (in spec order), so a trick has one colour in
    every figure of it. Tricks not listed get a colour from a stable hash of their name.
    """
    _TRICK_ORDER[:] = list(dict.fromkeys(tricks))


def trick_color(trick: str) -> tuple[float, ...]:
    """The colour of a trick in every figure: by its place in :func:`set_trick_order`, else a stable hash."""
    if trick in _TRICK_ORDER:
        idx = _TRICK_ORDER.index(trick)
    else:
        idx = len(_TRICK_ORDER) + zlib.crc32(trick.encode()) % len(_PALETTE)
    return tuple(_PALETTE[idx % len(_PALETTE)])


def arm_color(arm: str) -> tuple[float, ...]:
    """The colour of an arm: black for the reference (baseline / all), the trick's colour for ``+t`` and
    ``all-t``, the mean of its tricks' colours for a factorial combination ``a+b``."""
    if arm in ("baseline", "all"):
        return REFERENCE_COLOR
    if arm.startswith("+"):
        return trick_color(arm[1:])
    if arm.startswith("all-"):
        return trick_color(arm.removeprefix("all-"))
    parts = arm.split("+")
    return tuple(float(np.mean([trick_color(p)[i] for p in parts])) for i in range(3))


def _arm_style(arm: str) -> str:
    return "--" if arm.startswith("all-") else "-"


# --- figure data (the sidecar JSON) ------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _row(label: str, *values: Any) -> dict[str, Any]:
    return {"label": str(label), "values": [_num(v) for v in values]}


def _panel(title: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"title": title, "rows": rows}


def _has_data(rows: list[dict[str, Any]]) -> bool:
    return any(v is not None for r in rows for v in r["values"])


def empty_panels(data: dict[str, Any]) -> list[str]:
    """Titles of the panels of a figure's JSON (or "(no panels)") that draw nothing finite."""
    panels = data.get("panels", [])
    if not panels:
        return ["(no panels)"]
    return [p["title"] for p in panels if not _has_data(p["rows"])]


def _save(
    fig: plt.Figure,
    path: Path,
    panels: list[dict[str, Any]],
    formats: Sequence[str] = FIGURE_FORMATS,
    layout: bool = True,
) -> Path:
    """Write the figure as PNG (titled) and vector files (untitled), and its panels' numbers as JSON.
    ``layout=False``: the caller laid the figure out already."""
    path = Path(path)
    if layout:  # below the title (tight_layout leaves a suptitle over the top row of a tall figure)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight() if fig._suptitle is not None else 1))
    fig.savefig(path.with_suffix(".png"), dpi=DPI)
    vector = [f for f in formats if f != "png"]
    if vector and fig._suptitle is not None:  # the suptitle's only handle; the caption says it in a paper
        fig._suptitle.set_visible(False)
    for fmt in vector:
        fig.savefig(path.with_suffix(f".{fmt}"))
    plt.close(fig)
    data = {"figure": path.stem, "formats": list(formats), "panels": panels}
    path.with_suffix(".json").write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path.with_suffix(".png")


# --- axes helpers --------------------------------------------------------------------------------------------------
def _direction_note(higher_is_better: bool | None) -> str:
    if higher_is_better is None:
        return "no preferred direction"
    return "better →" if higher_is_better else "← better"


def _annotate_direction(ax: plt.Axes, higher_is_better: bool | None, text: str | None = None) -> None:
    """Write which side is better in the top corner of that side (inside the axes, above the data)."""
    text = text or _direction_note(higher_is_better)
    x, ha = (0.98, "right") if higher_is_better else (0.02, "left")
    if higher_is_better is None:
        x, ha = 0.5, "center"
    ax.text(
        x,
        0.985,
        text,
        transform=ax.transAxes,
        ha=ha,
        va="top",
        fontsize=9,
        fontweight="bold",
        color="#1a7f37",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
        zorder=5,
    )


def ratio_ticks(low: float, high: float, max_ticks: int = 7) -> list[float]:
    """Readable ticks of a log ratio axis from ``low`` to ``high``: the 1-2-5 series, else 1-3, else decades, else
    every other (fourth, ...) decade: the first with at most ``max_ticks`` labels."""
    if not (low > 0 and high > low):
        raise ValueError(f"low, high: {low}, {high} are not allowed; allowed: 0 < low < high")
    lo_dec, hi_dec = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for mantissas in ((1.0, 2.0, 5.0), (1.0, 3.0), (1.0,)):
        ticks = [round(m * 10.0**k, 12) for k in range(lo_dec, hi_dec + 1) for m in mantissas]
        ticks = [t for t in ticks if low <= t <= high]
        if len(ticks) <= max_ticks:
            return ticks or [1.0]
    step = 2
    while len(ticks) > max_ticks:
        ticks = [10.0**k for k in range(lo_dec, hi_dec + 1) if k % step == 0 and low <= 10.0**k <= high]
        step *= 2
    return ticks or [1.0]


def _ratio_label(v: float, _: Any = None) -> str:
    return f"{v:g}×"


def _ratio_axis(ax: plt.Axes, values: Sequence[float]) -> None:
    """A log axis for ratios, symmetric around 1×, at least 0.5×–2×, with :func:`ratio_ticks` labels."""
    logs = [abs(math.log(v)) for v in values if _pos(v)]
    lim = max([math.log(2.0), *logs]) * 1.15
    ax.set_xscale("log")
    ax.set_xlim(math.exp(-lim), math.exp(lim))
    ax.xaxis.set_major_locator(FixedLocator(ratio_ticks(math.exp(-lim), math.exp(lim))))
    ax.xaxis.set_major_formatter(FuncFormatter(_ratio_label))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pos(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _finite(v: Any) -> bool:
    return _num(v) is not None


def _interval(ax: plt.Axes, y: float, mean: float, lo: float, hi: float, color: Any, reliable: bool) -> None:
    if _finite(lo) and _finite(hi):
        ax.plot([lo, hi], [y, y], color=color, lw=2.2, ls="-" if reliable else ":", solid_capstyle="butt")
    if _finite(mean):
        ax.plot([mean], [y], "o", color=color, ms=7, mec="white", mew=0.8, zorder=3)


def _rows_axis(ax: plt.Axes, labels: Sequence[str], show: bool = True) -> None:
    k = len(labels)
    ax.set_yticks(range(k - 1, -1, -1), list(labels) if show else [""] * k)
    ax.set_ylim(-0.7, k - 0.3)


def _grid_of(n: int, ncols: int, width: float, height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, ncols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.5, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# --- the figures ---------------------------------------------------------------------------------------------------
def effect_gain(v: Any, higher_is_better: bool) -> float:
    """A trick's effect signed so that larger = better: in % of the trick-off metric when known (the order of
    the report's summary table)."""
    for col in ("effect_pct", "mean"):
        if _finite(v[col]):
            return float(v[col]) if higher_is_better else -float(v[col])
    return -math.inf


def overview_figure(tasks: Sequence[TaskStats], path: Path) -> Path | None:
    """Every trick of every task on one scale: the standardised paired effect d_z (mean / sd of the per-seed
    differences) with its 95% interval, oriented so that right = better, one panel per task, tricks in the
    order of the summary table (by effect, best first), coloured by verdict (rliable-style interval
    estimates). Tricks without a d_z (fewer than 2 usable seeds) are named under their panel; None when no
    task has one.
    """
    panels_in: list[tuple[TaskStats, list[tuple[str, float, float, float, str]], list[str]]] = []
    for ts in tasks:
        rows, missing = [], []
        for _, v in ts.verdicts.iterrows() if len(ts.verdicts) else []:
            sign = 1.0 if ts.higher_is_better else -1.0
            dz, lo, hi = sign * v["dz"], sign * v["dz_low"], sign * v["dz_high"]
            lo, hi = min(lo, hi), max(lo, hi)
            if math.isnan(dz):
                missing.append(str(v["term"]))
                continue
            rows.append((str(v["term"]), dz, lo, hi, str(v["verdict_class"]), effect_gain(v, ts.higher_is_better)))
        if rows:
            rows.sort(key=lambda r: -r[5])  # the order of the report's summary table: by effect, best first
            panels_in.append((ts, [r[:5] for r in rows], missing))
    if not panels_in:
        return None
    points = [abs(r[1]) for _, rows, _ in panels_in for r in rows if math.isfinite(r[1])]
    lim = float(np.clip(1.5 * max(points, default=1.0), 1.5, 6.0))
    n_rows = max(len(rows) for _, rows, _ in panels_in)
    ncols = 3 if len(panels_in) in (3, 5, 6) else 2  # wide enough to read when the page scales it down
    fig, axes = _grid_of(len(panels_in), ncols, 4.0, 0.42 * n_rows + 1.9)
    panels = []
    for ax, (ts, rows, missing) in zip(axes, panels_in):
        labels = []
        for i, (term, dz, lo, hi, cls) in enumerate(rows):
            y = len(rows) - 1 - i
            color = VERDICT_COLORS.get(cls, "#6e7781")
            lo_c, hi_c = max(lo, -lim), min(hi, lim)
            if math.isfinite(lo) or math.isfinite(hi):
                ax.plot([lo_c, hi_c], [y, y], color=color, lw=5, alpha=0.45, solid_capstyle="butt")
            if lo < -lim:  # the interval goes on beyond the axis
                ax.plot([-lim], [y], "<", color=color, ms=6, alpha=0.8)
            if hi > lim:
                ax.plot([lim], [y], ">", color=color, ms=6, alpha=0.8)
            ax.plot([max(-lim, min(lim, dz))], [y], "o" if math.isfinite(dz) else "D", color=color, ms=7,
                    mec="white", mew=0.8, zorder=3)  # fmt: skip
            labels.append(term)
        ax.axvspan(-MIN_EFFECT_SIZE, MIN_EFFECT_SIZE, color="0.92", zorder=0)
        ax.axvline(0, color="0.3", lw=1)
        ax.set_xlim(-lim * 1.05, lim * 1.05)
        _rows_axis(ax, labels)
        ax.set_xlabel("d_z (right = better)")
        ax.set_title(f"{ts.label}: {ts.metric}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        if missing:
            ax.text(0.0, -0.16 - 0.02 * n_rows ** 0.5, "no d_z (< 2 seeds): " + ", ".join(missing), fontsize=7,
                    transform=ax.transAxes, color="0.35", va="top", wrap=True)  # fmt: skip
        panels.append(_panel(ts.label, [_row(t, dz, lo, hi) for t, dz, lo, hi, _ in rows]))
    handles = [
        plt.Line2D([], [], color=c, marker="o", lw=4, alpha=0.7, label=k)
        for k, c in VERDICT_COLORS.items()
        if any(r[4] == k for _, rows, _ in panels_in for r in rows)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"paired effects d_z, 95% CI; right = better; grey: |d_z| < {MIN_EFFECT_SIZE}", fontsize=9)
    fig.tight_layout(rect=(0, min(0.3, 0.45 / fig.get_figheight()), 1, 1))  # room for the legend below
    return _save(fig, path, panels, layout=False)


def forest_plot(ts: TaskStats, path: Path, metrics: Sequence[str] | None = None) -> Path | None:
    """Effects (on − off) with 95% CIs: one panel per metric of this task that has an effect, one row per trick,
    a zero line, the better side marked. Dotted intervals come from fewer than 2 seeds (none possible)."""
    eff = ts.effects[ts.effects["kind"] == "main"] if len(ts.effects) else ts.effects
    primary = f"metric.{ts.metric}"
    if metrics is None:
        metrics = [m for m in ts.metric_directions or [primary] if m.startswith("metric.")]
    terms = ts.tricks
    chosen = []
    for metric in metrics:
        sel = eff[eff["metric"] == metric].set_index("term") if len(eff) else pd.DataFrame()
        if len(sel) and sel["mean"].map(_finite).any():
            chosen.append((metric, sel))
    if not chosen or not terms:
        return None
    fig, axes = _grid_of(len(chosen), MAX_FOREST_COLUMNS, 4.6, 0.55 * len(terms) + 1.9)
    verdicts = dict(zip(ts.verdicts["term"], ts.verdicts["verdict"])) if len(ts.verdicts) else {}
    panels = []
    for i, (ax, (metric, sel)) in enumerate(zip(axes, chosen)):
        hib = ts.metric_directions.get(metric) if ts.metric_directions else None
        rows = []
        for row_i, term in enumerate(terms):
            y = len(terms) - 1 - row_i
            if term not in sel.index:
                continue
            r = sel.loc[term]
            _interval(ax, y, r["mean"], r["ci_low"], r["ci_high"], trick_color(term), r["n"] >= MIN_RELIABLE_CI_SEEDS)
            rows.append(_row(term, r["mean"], r["ci_low"], r["ci_high"]))
        ax.axvline(0, color="0.3", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))  # no offset text over the label
        labels = []
        for term in terms:
            n = int(sel.loc[term, "n"]) if term in sel.index else 0
            alias = f" (+{sel.loc[term, 'aliases']})" if term in sel.index and sel.loc[term, "aliases"] else ""
            labels.append(f"{term}{alias}  n={n}")
        _rows_axis(ax, labels, show=i % MAX_FOREST_COLUMNS == 0)
        name = metric.removeprefix("metric.")
        ax.set_xlabel(f"Δ {name} (trick on − off)")
        ax.set_title(name + (" (primary)" if metric == primary else ""), fontsize=10)
        _annotate_direction(ax, None if hib is None else bool(hib))
        ax.grid(axis="x", alpha=0.3)
        if metric == primary:
            for row_i, term in enumerate(terms):
                if term in verdicts:
                    ax.annotate(
                        verdicts[term],
                        (1.0, len(terms) - 1 - row_i),
                        xycoords=("axes fraction", "data"),
                        xytext=(4, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=8,
                        color="0.25",
                    )
        panels.append(_panel(name, rows))
    fig.suptitle(f"{ts.label}: paired effects with 95% CI, one panel per metric", fontsize=10)
    return _save(fig, path, panels)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


MAX_BANDED_ARMS = 12  # with more arms the learning curves draw lines only, and the legend goes below


def _band(
    ax: plt.Axes, df: pd.DataFrame, x: str, y: str, arm: str, log: bool = False, band: bool = True
) -> dict[str, Any] | None:
    agg = df.groupby(x)[y].agg(["mean", "min", "max", "count"])
    agg = agg[np.isfinite(agg["mean"])]
    if log:
        agg = agg[agg["min"] > 0]
    if not len(agg):
        return None
    color = arm_color(arm)
    n = int(df["seed"].nunique())
    ax.plot(agg.index, agg["mean"], color=color, lw=1.6 if band else 1.0, ls=_arm_style(arm), label=f"{arm} (n={n})")
    if band:
        ax.fill_between(agg.index, agg["min"], agg["max"], color=color, alpha=0.13, lw=0)
    return _row(arm, *agg["mean"].tolist())


def learning_curves(
    curves: pd.DataFrame, train: pd.DataFrame, ts: TaskStats, path: Path, arm_order: Sequence[str] = ()
) -> Path | None:
    """Left: the primary eval metric by samples seen (one estimator throughout: the final evaluation's larger
    sample goes to result.json, not to the curve); right: the training loss (smoothed per run).

    Lines are the mean over seeds, bands the range from the lowest to the highest seed.
    """
    arms = list(arm_order) or (list(dict.fromkeys(curves["arm"])) if len(curves) else [])
    arms = [a for a in arms if a != ts.reference_arm] + [a for a in arms if a == ts.reference_arm]  # reference on top
    band = len(arms) <= MAX_BANDED_ARMS
    legend_cols = 3 if max((len(a) for a in arms), default=0) <= 40 else 2
    legend_rows = 0 if band else -(-len(arms) // legend_cols)
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(12, 4.4 + 0.17 * legend_rows))
    eval_rows, train_rows = [], []
    for arm in arms:
        df = curves[curves["arm"] == arm] if len(curves) and "arm" in curves else pd.DataFrame()
        if len(df) and ts.metric in df:
            row = _band(ax_e, df.dropna(subset=[ts.metric]), "samples", ts.metric, arm, band=band)
            eval_rows += [row] if row else []
        tr = train[train["arm"] == arm] if len(train) and "arm" in train else pd.DataFrame()
        if len(tr) and "loss" in tr:
            parts = []
            for _, run in tr.groupby("run_id"):
                run = run.sort_values("samples")
                window = max(1, len(run) // 40)
                parts.append(run.assign(loss=_smooth(run["loss"].to_numpy(dtype=float), window)))
            sm = pd.concat(parts)
            sm = sm[np.isfinite(sm["loss"])]
            row = _band(ax_t, sm, "samples", "loss", arm, log=True, band=band) if len(sm) else None
            train_rows += [row] if row else []
    if not eval_rows and not train_rows:
        plt.close(fig)
        return None
    panels = []
    if eval_rows:
        ax_e.set_xlabel("training samples seen")
        ax_e.set_ylabel(ts.metric)
        note = _direction_note(ts.higher_is_better).replace("←", "↓").replace("→", "↑")
        ax_e.set_title(f"{ts.metric} (eval) — {note}")
        panels.append(_panel(f"{ts.metric} (eval)", eval_rows))
    else:
        ax_e.set_visible(False)
    if train_rows:
        ax_t.set_xlabel("training samples seen")
        ax_t.set_ylabel("training loss (running mean per run, log scale)")
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax_t.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax_t.set_title("training loss")
        panels.append(_panel("training loss", train_rows))
    else:
        ax_t.set_visible(False)
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
        if band and ax.get_visible() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    what = "band: lowest to highest seed" if band else f"{len(arms)} arms: no bands"
    fig.suptitle(f"{ts.label}: learning curves (line: mean over seeds; {what})", fontsize=10)
    if band:
        return _save(fig, path, panels)
    source = ax_e if ax_e.get_visible() else ax_t  # every arm once, below both panels
    fig.legend(*source.get_legend_handles_labels(), loc="lower center", ncol=legend_cols, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.17 * legend_rows / fig.get_figheight() + 0.01, 1, 1))
    return _save(fig, path, panels, layout=False)


def stability_chart(ts: TaskStats, path: Path) -> Path | None:
    """Per trick: across-seed spread ratio with CI, Δ loss spikes per run with CI, divergence rate on vs off
    (each panel only when some trick has its numbers)."""
    st = ts.stability.set_index("term") if len(ts.stability) else pd.DataFrame()
    terms = ts.tricks
    ys = {t: len(terms) - 1 - i for i, t in enumerate(terms)}

    def value(t: str, col: str) -> float:
        return float(st.loc[t, col]) if t in st.index and col in st and pd.notna(st.loc[t, col]) else float("nan")

    wanted = [
        name
        for name, col in (("spread", "spread_ratio"), ("spikes", "spikes_diff"), ("diverged", "diverged_on"))
        if any(math.isfinite(value(t, col)) for t in terms)
    ]
    if not wanted:
        return None
    fig, axes = plt.subplots(1, len(wanted), figsize=(4.7 * len(wanted) + 0.5, 0.5 * len(terms) + 2.2), squeeze=False)
    panels = []
    for ax, name in zip(axes[0], wanted):
        rows = []
        if name == "spread":
            for t in terms:
                r, lo, hi = value(t, "spread_ratio"), value(t, "spread_low"), value(t, "spread_high")
                _interval(ax, ys[t], r, lo, hi, trick_color(t), True)
                rows.append(_row(t, r, lo, hi))
            ax.axvline(1, color="0.3", lw=1)
            _ratio_axis(ax, [value(t, c) for t in terms for c in ("spread_ratio", "spread_low", "spread_high")])
            ax.set_xlabel(f"spread of {ts.metric} across seeds, on / off (×, log scale)")
            ax.set_title("seed spread ratio")
            _annotate_direction(ax, False, "← less spread")
        elif name == "spikes":
            for t in terms:
                d, lo, hi = value(t, "spikes_diff"), value(t, "spikes_low"), value(t, "spikes_high")
                _interval(ax, ys[t], d, lo, hi, trick_color(t), value(t, "spikes_n") >= MIN_RELIABLE_CI_SEEDS)
                rows.append(_row(t, d, lo, hi))
            ax.axvline(0, color="0.3", lw=1)
            spikes = [abs(v) for r in rows for v in r["values"] if v is not None]
            lim = max([1.0, *spikes]) * 1.15
            ax.set_xlim(-lim, lim)
            ax.set_xlabel("Δ loss spikes per run (on − off, count)")
            ax.set_title("loss spikes")
            _annotate_direction(ax, False)
        else:
            for t in terms:
                off, on = value(t, "diverged_off"), value(t, "diverged_on")
                if not math.isfinite(on):
                    continue
                ax.plot([off, on], [ys[t], ys[t]], color=trick_color(t), lw=1.2, alpha=0.6)
                ax.plot([off], [ys[t]], "o", mfc="white", mec="black", ms=7, label="trick off" if not rows else None)
                ax.plot([on], [ys[t]], "o", color=trick_color(t), ms=7, label="trick on" if not rows else None)
                ax.annotate(f"{value(t, 'diverged_total_on'):.0f} vs {value(t, 'diverged_total_off'):.0f} runs",
                            (1.0, ys[t]), xycoords=("axes fraction", "data"), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=8, color="0.25")  # fmt: skip
                rows.append(_row(t, on, off))
            ax.set_xlim(-0.05, 1.05)
            ax.set_xlabel("fraction of finished runs that diverged")
            ax.set_title("divergence rate, trick on vs off")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
        _rows_axis(ax, terms, show=ax is axes[0][0])
        ax.grid(axis="x", alpha=0.3)
        panels.append(_panel(ax.get_title(), rows))
    fig.suptitle(f"{ts.label}: stability (95% CIs over seeds)", fontsize=10)
    return _save(fig, path, panels)


def cost_chart(ts: TaskStats, path: Path) -> Path | None:
    """Train time per sample and peak memory per sample, trick on / off, as paired ratios with 95% CIs (each
    panel only when some trick has the ratio; memory marked approximate when measured on a CPU)."""
    c = ts.cost.set_index("term") if len(ts.cost) else pd.DataFrame()
    terms = ts.tricks
    approx = " (approximate: CPU heap growth)" if ts.memory_approximate else ""
    specs = [
        (name, label)
        for name, label in (
            ("time", "train time per sample, on / off (×)"),
            ("memory", f"peak memory per sample, on / off (×){approx}"),
        )
        if f"{name}_ratio" in c and c[f"{name}_ratio"].map(_finite).any()
    ]
    if not specs:
        return None
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs) + 0.5, 0.5 * len(terms) + 2.0), squeeze=False)
    panels = []
    for ax, (name, label) in zip(axes[0], specs):
        rows = []
        for i, t in enumerate(terms):
            if t in c.index and _finite(c.loc[t, f"{name}_ratio"]):
                r = c.loc[t]
                _interval(ax, len(terms) - 1 - i, r[f"{name}_ratio"], r[f"{name}_low"], r[f"{name}_high"],
                          trick_color(t), True)  # fmt: skip
                rows.append(_row(t, r[f"{name}_ratio"], r[f"{name}_low"], r[f"{name}_high"]))
        ax.axvline(1, color="0.3", lw=1)
        cols = [f"{name}_{x}" for x in ("ratio", "low", "high")]
        _ratio_axis(ax, pd.to_numeric(c[cols].stack(), errors="coerce").tolist())
        ax.set_xlabel(label + ", log scale", fontsize=9)
        _rows_axis(ax, terms, show=ax is axes[0][0])
        ax.grid(axis="x", alpha=0.3)
        _annotate_direction(ax, False, "← cheaper")
        ax.set_title(name)
        panels.append(_panel(name, rows))
    fig.suptitle(f"{ts.label}: cost relative to the trick off (per-seed ratios, geometric mean, 95% CI)", fontsize=10)
    return _save(fig, path, panels)


def interaction_heatmap(ts: TaskStats, path: Path) -> Path | None:
    """Main effects (diagonal) and two-way interactions (off-diagonal) of the primary metric; * = p(Holm) < 0.05."""
    k = len(ts.tricks)
    primary = f"metric.{ts.metric}"
    eff = ts.effects[ts.effects["metric"] == primary].set_index("term") if len(ts.effects) else pd.DataFrame()
    values = np.full((k, k), np.nan)
    text = [["" for _ in range(k)] for _ in range(k)]
    names = {}
    for term in eff.index:
        names[term] = term
        for alias in str(eff.loc[term, "aliases"]).split(", ") if eff.loc[term, "aliases"] else []:
            names[alias.lstrip("−")] = term
    rows = []
    for i, a in enumerate(ts.tricks):
        for j, b in enumerate(ts.tricks):
            if j < i:
                continue
            key = a if i == j else f"{a}×{b}"
            term = names.get(key)
            if term is None or term not in eff.index or not _finite(eff.loc[term, "mean"]):
                text[i][j] = text[j][i] = "n/a"
                continue
            r = eff.loc[term]
            star = "*" if _finite(r["p_holm"]) and r["p_holm"] < 0.05 else ""
            alias = "" if term == key else f"\n= {term}"
            values[i, j] = values[j, i] = r["mean"]
            text[i][j] = text[j][i] = f"{r['mean']:.3g}{star}{alias}"
            rows.append(_row(key, r["mean"]))
    if not _has_data(rows):
        return None
    fig, ax = plt.subplots(figsize=(1.3 * k + 3.2, 1.1 * k + 1.8))
    finite = values[np.isfinite(values)]
    lim = float(np.max(np.abs(finite))) if finite.size and np.max(np.abs(finite)) > 0 else 1.0
    cmap = "RdBu" if ts.higher_is_better else "RdBu_r"  # blue = better either way
    im = ax.imshow(values, cmap=cmap, norm=TwoSlopeNorm(0, -lim, lim))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), ts.tricks, rotation=30, ha="right")
    ax.set_yticks(range(k), ts.tricks)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"effect on {ts.metric} ({ts.metric} units); blue = better")
    res = f", resolution {ts.resolution}" if ts.resolution else ""
    ax.set_title(
        f"{ts.label}: main effects (diagonal) and two-way interactions{res}\n* p(Holm) < 0.05; '= x' aliased term",
        fontsize=9,
    )
    return _save(fig, path, [_panel("effects", rows)])


def outputs_figures(
    panels: Sequence[tuple[str, Path]], path: Path, title: str, per_page: int = OUTPUT_ARMS_PER_PAGE
) -> list[Path]:
    """Stack the task's own output pictures (one per arm, each captioned) into figures of at most ``per_page``
    arms: ``<path>`` and, for more arms, ``<stem>_2.png``, ``<stem>_3.png``, ... — every arm is drawn.

    The pictures are stacked as pixels into one image on one axes (one axes per arm costs seconds); the
    figures are PNG only (their content is raster).
    """
    path = Path(path)
    pages = [list(panels[i : i + per_page]) for i in range(0, len(panels), per_page)]
    out = []
    for n, page in enumerate(pages, start=1):
        target = path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")
        suffix = f" (page {n} of {len(pages)})" if len(pages) > 1 else ""
        out.append(_outputs_page(page, target, title + suffix))
    return out


def _outputs_page(panels: Sequence[tuple[str, Path]], path: Path, title: str) -> Path:
    images = [np.asarray(plt.imread(str(p)), dtype=np.float32) for _, p in panels]
    images = [np.dstack([img[..., :3], np.ones(img.shape[:2], np.float32)]) if img.shape[2] == 3 else img
              for img in images]  # fmt: skip
    width = max(img.shape[1] for img in images)
    gap = 28  # pixels of white above each picture for its caption
    rows, tops = [], []
    for img in images:
        pad = np.ones((gap + img.shape[0], width, 4), np.float32)
        pad[gap:, : img.shape[1]] = img
        tops.append(sum(r.shape[0] for r in rows))
        rows.append(pad)
    canvas = np.concatenate(rows)
    fig = plt.figure(figsize=(width / DPI, canvas.shape[0] / DPI + 0.4), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + 0.4 * DPI)))
    ax.imshow(canvas, interpolation="none")
    for (caption, _), top in zip(panels, tops):
        ax.text(6, top + gap - 6, caption, fontsize=9, va="bottom", ha="left")
    ax.axis("off")
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    data = {"figure": path.stem, "formats": ["png"], "panels": [_panel(c, [_row(c, img.size)]) for (c, _), img in
                                                                  zip(panels, images)]}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return path
