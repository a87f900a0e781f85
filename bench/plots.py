"""Figures of a grid report, one function per figure; each writes a PNG and returns its path.

Called by ``bench/report.py``; inputs are the frames of ``bench.store`` and the
:class:`bench.stats.TaskStats` of a task. Every trick has one colour in every figure
(:func:`trick_color`, by its place in the trick registry); the reference arm is black.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from bench.stats import MIN_RELIABLE_CI_SEEDS, TaskStats
from tricks.registry import REGISTRY

__all__ = [
    "arm_color",
    "cost_chart",
    "forest_plot",
    "interaction_heatmap",
    "learning_curves",
    "outputs_figure",
    "stability_chart",
    "trick_color",
]

DPI = 110
# 20 distinguishable colours: tab10, then the dark halves of tab20b/tab20c hues (no greys: grey means "other")
_PALETTE: tuple[tuple[float, ...], ...] = (
    tuple(plt.get_cmap("tab10").colors[:7])
    + tuple(plt.get_cmap("tab10").colors[8:])
    + tuple(plt.get_cmap("tab20b").colors[i] for i in (0, 4, 8, 12, 16))
    + tuple(plt.get_cmap("Dark2").colors[i] for i in (0, 1, 2, 3, 5, 6))
)
REFERENCE_COLOR = (0.0, 0.0, 0.0)


def trick_color(trick: str) -> tuple[float, ...]:
    """The colour of a trick in every figure: by its registry position, a stable hash for unknown names."""
    names = list(REGISTRY)
    idx = names.index(trick) if trick in names else len(names) + zlib.crc32(trick.encode()) % len(_PALETTE)
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


def _ratio_axis(ax: plt.Axes, values: Sequence[float]) -> None:
    """A log axis for ratios, symmetric around 1×, at least 0.5×–2×, ticks labelled 0.5×, 1×, 2×, ..."""
    logs = [abs(math.log(v)) for v in values if _pos(v)]
    lim = max([math.log(2.0), *logs]) * 1.15
    ax.set_xscale("log")
    ax.set_xlim(math.exp(-lim), math.exp(lim))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pos(v: float) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _interval(ax: plt.Axes, y: float, mean: float, lo: float, hi: float, color: tuple, reliable: bool) -> None:
    if math.isfinite(lo) and math.isfinite(hi):
        ax.plot([lo, hi], [y, y], color=color, lw=2.2, ls="-" if reliable else ":", solid_capstyle="butt")
    if math.isfinite(mean):
        ax.plot([mean], [y], "o", color=color, ms=7, mec="white", mew=0.8, zorder=3)


def forest_plot(ts: TaskStats, path: Path, metrics: Sequence[str] | None = None) -> Path:
    """Effects (on − off) with 95% CIs: one panel per metric, one row per trick, a zero line, the better side marked.

    Dotted intervals come from fewer than 6 seeds (cannot reach their nominal coverage).
    """
    eff = ts.effects[ts.effects["kind"] == "main"] if len(ts.effects) else ts.effects
    primary = f"metric.{ts.metric}"
    if metrics is None:
        secondary = [m for m in dict.fromkeys(eff["metric"]) if m.startswith("metric.") and m != primary]
        metrics = [primary, *secondary[:2]]
    terms = ts.tricks
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.6 * len(metrics) + 1.5, 0.55 * len(terms) + 1.8), squeeze=False
    )
    verdicts = dict(zip(ts.verdicts["term"], ts.verdicts["verdict"])) if len(ts.verdicts) else {}
    for ax, metric in zip(axes[0], metrics):
        sel = eff[eff["metric"] == metric].set_index("term") if len(eff) else pd.DataFrame()
        hib = None
        for row_i, term in enumerate(terms):
            y = len(terms) - 1 - row_i
            if term not in sel.index:
                continue
            r = sel.loc[term]
            hib = r["higher_is_better"]
            _interval(ax, y, r["mean"], r["ci_low"], r["ci_high"], trick_color(term), r["n"] >= MIN_RELIABLE_CI_SEEDS)
        ax.axvline(0, color="0.3", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))  # no offset text over the label
        labels = []
        for term in terms:
            n = int(sel.loc[term, "n"]) if term in sel.index else 0
            alias = f" (+{sel.loc[term, 'aliases']})" if term in sel.index and sel.loc[term, "aliases"] else ""
            labels.append(f"{term}{alias}  n={n}")
        ax.set_yticks(range(len(terms) - 1, -1, -1), labels if ax is axes[0][0] else [""] * len(terms))
        ax.set_ylim(-0.7, len(terms) - 0.3)
        name = metric.removeprefix("metric.")
        ax.set_xlabel(f"Δ {name} (trick on − off, {name} units)")
        ax.set_title(name + (" (primary)" if metric == primary else ""), fontsize=10)
        _annotate_direction(ax, None if hib is None or (isinstance(hib, float) and math.isnan(hib)) else bool(hib))
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
    fig.suptitle(f"{ts.label}: paired effects with 95% CI (dotted: < {MIN_RELIABLE_CI_SEEDS} seeds)", fontsize=10)
    return _save(fig, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


def _band(ax: plt.Axes, df: pd.DataFrame, x: str, y: str, arm: str, log: bool = False) -> None:
    agg = df.groupby(x)[y].agg(["mean", "min", "max", "count"])
    if log:
        agg = agg[agg["min"] > 0]
    color = arm_color(arm)
    n = int(df["seed"].nunique())
    ax.plot(agg.index, agg["mean"], color=color, lw=1.6, ls=_arm_style(arm), label=f"{arm} (n={n})")
    ax.fill_between(agg.index, agg["min"], agg["max"], color=color, alpha=0.13, lw=0)


def learning_curves(
    curves: pd.DataFrame, train: pd.DataFrame, ts: TaskStats, path: Path, arm_order: Sequence[str] = ()
) -> Path:
    """Left: the primary eval metric by samples seen; right: the training loss (smoothed per run).

    Lines are the mean over seeds, bands the range from the lowest to the highest seed.
    """
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(12, 4.4))
    arms = list(arm_order) or (list(dict.fromkeys(curves["arm"])) if len(curves) else [])
    arms = [a for a in arms if a != ts.reference_arm] + [a for a in arms if a == ts.reference_arm]  # reference on top
    for arm in arms:
        df = curves[curves["arm"] == arm] if len(curves) else curves
        if len(df) and ts.metric in df:
            _band(ax_e, df.dropna(subset=[ts.metric]), "samples", ts.metric, arm)
        tr = train[train["arm"] == arm] if len(train) else train
        if len(tr) and "loss" in tr:
            parts = []
            for _, run in tr.groupby("run_id"):
                run = run.sort_values("samples")
                window = max(1, len(run) // 40)
                parts.append(run.assign(loss=_smooth(run["loss"].to_numpy(dtype=float), window)))
            sm = pd.concat(parts)
            sm = sm[np.isfinite(sm["loss"])]
            _band(ax_t, sm, "samples", "loss", arm, log=True)
    ax_e.set_xlabel("training samples seen")
    ax_e.set_ylabel(ts.metric)
    ax_e.set_title(f"{ts.metric} (eval) — {_direction_note(ts.higher_is_better).replace('←', '↓').replace('→', '↑')}")
    ax_t.set_xlabel("training samples seen")
    ax_t.set_ylabel("training loss (running mean per run, log scale)")
    ax_t.set_yscale("log")
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax_t.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax_t.set_title("training loss")
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{ts.label}: learning curves (line: mean over seeds; band: lowest to highest seed)", fontsize=10)
    return _save(fig, path)


def stability_chart(ts: TaskStats, path: Path) -> Path:
    """Per trick: across-seed spread ratio with CI, Δ loss spikes per run with CI, divergence rate on vs off."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(ts.tricks) + 2.2))
    st = ts.stability.set_index("term") if len(ts.stability) else pd.DataFrame()
    terms = ts.tricks
    ys = {t: len(terms) - 1 - i for i, t in enumerate(terms)}

    def value(t: str, col: str) -> float:
        return float(st.loc[t, col]) if t in st.index and col in st and pd.notna(st.loc[t, col]) else float("nan")

    ax = axes[0]
    for t in terms:
        _interval(ax, ys[t], value(t, "spread_ratio"), value(t, "spread_low"), value(t, "spread_high"),
                  trick_color(t), True)  # fmt: skip
    ax.axvline(1, color="0.3", lw=1)
    _ratio_axis(ax, [value(t, c) for t in terms for c in ("spread_ratio", "spread_low", "spread_high")])
    ax.set_xlabel(f"std of {ts.metric} across seeds, on / off (×, log scale)")
    ax.set_title("seed spread ratio")
    _annotate_direction(ax, False, "← less spread")

    ax = axes[1]
    for t in terms:
        _interval(ax, ys[t], value(t, "spikes_diff"), value(t, "spikes_low"), value(t, "spikes_high"),
                  trick_color(t), value(t, "spikes_n") >= MIN_RELIABLE_CI_SEEDS)  # fmt: skip
    ax.axvline(0, color="0.3", lw=1)
    spikes = [abs(value(t, c)) for t in terms for c in ("spikes_low", "spikes_high", "spikes_diff")]
    lim = max([1.0, *[v for v in spikes if math.isfinite(v)]]) * 1.15
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("Δ loss spikes per run (on − off, count)")
    ax.set_title("loss spikes")
    _annotate_direction(ax, False)

    ax = axes[2]
    for t in terms:
        off, on = value(t, "diverged_off"), value(t, "diverged_on")
        if not math.isfinite(on):
            continue
        ax.plot([off, on], [ys[t], ys[t]], color=trick_color(t), lw=1.2, alpha=0.6)
        ax.plot([off], [ys[t]], "o", mfc="white", mec="black", ms=7, label="trick off" if t == terms[0] else None)
        ax.plot([on], [ys[t]], "o", color=trick_color(t), ms=7, label="trick on" if t == terms[0] else None)
        ax.annotate(
            f"{value(t, 'diverged_total_on'):.0f} vs {value(t, 'diverged_total_off'):.0f} runs",
            (1.0, ys[t]),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="0.25",
        )
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("fraction of finished runs that diverged")
    ax.set_title("divergence rate, trick on vs off")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_yticks(range(len(terms) - 1, -1, -1), terms if ax is axes[0] else [""] * len(terms))
        ax.set_ylim(-0.7, len(terms) - 0.3)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{ts.label}: stability (95% CIs over seeds)", fontsize=10)
    return _save(fig, path)


def cost_chart(ts: TaskStats, path: Path) -> Path:
    """Train time per sample and peak memory per sample, trick on / off, as ratios with 95% CIs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(ts.tricks) + 2.0))
    c = ts.cost.set_index("term") if len(ts.cost) else pd.DataFrame()
    terms = ts.tricks
    for ax, name, label in (
        (axes[0], "time", "train time per sample, on / off (×)"),
        (axes[1], "memory", "peak memory per sample, on / off (×)"),
    ):
        for i, t in enumerate(terms):
            if t in c.index and math.isfinite(c.loc[t, f"{name}_ratio"]):
                r = c.loc[t]
                _interval(
                    ax,
                    len(terms) - 1 - i,
                    r[f"{name}_ratio"],
                    r[f"{name}_low"],
                    r[f"{name}_high"],
                    trick_color(t),
                    True,
                )
        ax.axvline(1, color="0.3", lw=1)
        cols = [f"{name}_{x}" for x in ("ratio", "low", "high") if f"{name}_{x}" in c]
        _ratio_axis(ax, c[cols].to_numpy().ravel().tolist() if cols else [])
        ax.set_xlabel(label + ", log scale")
        ax.set_yticks(range(len(terms) - 1, -1, -1), terms)
        ax.set_ylim(-0.7, len(terms) - 0.3)
        ax.grid(axis="x", alpha=0.3)
        _annotate_direction(ax, False, "← cheaper")
    axes[0].set_title("time")
    axes[1].set_title("memory")
    fig.suptitle(f"{ts.label}: cost relative to the trick off (geometric mean over seeds, 95% CI)", fontsize=10)
    return _save(fig, path)


def interaction_heatmap(ts: TaskStats, path: Path) -> Path:
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
    for i, a in enumerate(ts.tricks):
        for j, b in enumerate(ts.tricks):
            if j < i:
                continue
            key = a if i == j else f"{a}×{b}"
            term = names.get(key)
            if term is None or term not in eff.index:
                text[i][j] = "n/a"
                continue
            r = eff.loc[term]
            star = "*" if math.isfinite(r["p_holm"]) and r["p_holm"] < 0.05 else ""
            alias = "" if term == key else f"\n= {term}"
            values[i, j] = values[j, i] = r["mean"]
            text[i][j] = text[j][i] = f"{r['mean']:.3g}{star}{alias}"
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
    return _save(fig, path)


def outputs_figure(panels: Sequence[tuple[str, Path]], path: Path, title: str) -> Path:
    """Stack the task's own output pictures (one per arm) into one figure, each captioned with its arm.

    The pictures are stacked as pixels into one image on one axes (one axes per arm costs seconds).
    """
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
    return path
