"""Reports of a grid: ``report.md`` + self-contained ``report.html`` + ``figures/*.png`` + ``effects.csv``.

Called at the end of ``bench run`` and by ``bench report`` (:func:`write_report`);
:func:`terminal_summary` is the short table printed after a run. Reads only the store and
the stored spec; all numbers come from :mod:`bench.stats`, all figures from :mod:`bench.plots`.
Re-writing a report replaces these files; nothing else in the grid folder changes.
"""

from __future__ import annotations

import base64
import html
import math
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench import plots, store
from bench.plots import arm_color, learning_curves
from bench.stats import (
    ALPHA,
    CONFIDENCE,
    MIN_EFFECT_SIZE,
    MIN_RELIABLE_CI_SEEDS,
    MIN_TEST_SEEDS,
    POWER,
    SEEDS_NEEDED_CONFIDENCE,
    GridStats,
    TaskStats,
    analyze_grid,
)

__all__ = ["arm_color", "terminal_summary", "write_report"]

MAX_OUTPUT_ARMS = 8  # rows of the outputs picture


# --- number formatting ---------------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _g(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}g}" if _finite(x) else "—"


def _p(p: Any) -> str:
    if not _finite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _mean_std(mean: Any, std: Any) -> str:
    if not _finite(mean):
        return "—"
    return f"{mean:.4g} ± {std:.2g}" if _finite(std) else f"{mean:.4g}"


def _effect(mean: Any, lo: Any, hi: Any, n: Any = None) -> str:
    if not _finite(mean):
        return "—"
    dagger = "†" if _finite(n) and int(n) < MIN_RELIABLE_CI_SEEDS and _finite(lo) else ""
    ci = f" [{_g(lo)}, {_g(hi)}]{dagger}" if _finite(lo) else ""
    return f"{mean:+.3g}{ci}"


def _ratio(r: Any, lo: Any, hi: Any) -> str:
    if not _finite(r):
        return "—"
    return f"{r:.3g}×" + (f" [{lo:.3g}, {hi:.3g}]" if _finite(lo) else "")


def _frac(f: Any, n: Any) -> str:
    if not _finite(f) or not _finite(n) or int(n) == 0:
        return "—"
    return f"{round(f * n)}/{int(n)}"


def _seeds(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else str(int(x))


def _seeds_range(v: Any) -> str:
    """Seeds needed as the range of :func:`bench.stats.seeds_needed_interval`: "12–40", "≥ 12", or "—"."""
    lo, hi = v.get("seeds_needed_low"), v.get("seeds_needed_high")
    if not _finite(lo):
        return "—"
    if not _finite(hi):
        return f"≥ {int(lo)}"
    return str(int(lo)) if int(lo) == int(hi) else f"{int(lo)}–{int(hi)}"


def _direction(hib: bool) -> str:
    return "higher is better" if hib else "lower is better"


# --- a tiny document model: written once, rendered as markdown and as HTML --------------------------------
@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def figure(self, title: str, path: Path) -> None:
        self.blocks.append(("fig", (title, path)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, body in self.blocks:
            if kind == "h":
                out += ["#" * body[0] + " " + body[1], ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in body] + [""]
            elif kind == "table":
                header, rows = body
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "fig":
                out += [f"![{body[0]}](figures/{body[1].name})", ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0 1.2em;font-size:0.85em}"
            "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
            "th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}"
            "img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}"
            "figure{margin:0.5em 0 1.5em}figcaption{font-size:0.85em;color:#555}</style></head><body>",
        ]
        for kind, body in self.blocks:
            if kind == "h":
                out.append(f"<h{body[0]}>{_inline(body[1])}</h{body[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(body)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body) + "</ul>")
            elif kind == "table":
                header, rows = body
                out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead>")
                out.append(
                    "<tbody>"
                    + "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                    + "</tbody></table>"
                )
            elif kind == "fig":
                b64 = base64.b64encode(body[1].read_bytes()).decode()
                alt = html.escape(body[0], quote=True)
                out.append(
                    f"<figure><img alt='{alt}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{_inline(body[0])}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's inline `code` and **bold** as HTML (everything else escaped)."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)


# --- the report ------------------------------------------------------------------------------------------------
def _methods(gs: GridStats) -> list[str]:
    return [
        "**Pairing.** Seed *s* of every arm shares one seed bundle (init, data order, augmentation, noise), so "
        "each effect is computed per seed: **effect = metric with the trick on − with it off, same seed**. "
        "one_at_a_time: `+trick − baseline`; leave_one_out: `all − all-trick` (what the trick adds to the full "
        "recipe); factorial designs: the ±1-coded contrast per seed (mean of the arms with the trick on − mean of "
        "those with it off; seed is a blocking factor).",
        f"**Interval.** {CONFIDENCE:.0%} paired t-interval of the mean difference over seeds. Its coverage is "
        "measured in CI (tests/test_calibration.py): 93.9–96.6% at 2 to 20 seeds on normal, heavy-tailed (t₃), "
        "lognormal, skewed and outlier-prone simulated metrics; strongly skewed differences (skewness ≥ 2) cover "
        f"less (88–92%). An interval needs {MIN_TEST_SEEDS} seeds; † marks one that is not calibrated.",
        "**p-value.** Paired t-test of the mean difference, the test the interval inverts (so p < 0.05 exactly when "
        "the 95% interval excludes 0); **p (Holm)** adjusts across the tricks of a task, per metric "
        "(Benjamini–Hochberg q and the exact sign-flip permutation p in effects.csv).",
        f"**Verdict** (primary metric, direction-aware): **helps** / **hurts** when p (Holm) < {ALPHA} (the interval "
        f"then excludes 0 on that side); **no detectable effect** when not significant and the {CONFIDENCE:.0%} "
        f"interval of the effect size d_z = mean / sd of the differences lies within ±{MIN_EFFECT_SIZE} (any effect "
        f"is small next to the seed noise); otherwise **needs more seeds**, with the reason: too few seeds for a "
        f"test (fewer than {MIN_TEST_SEEDS}) or inconclusive. A significant change of the divergence rate (exact "
        f"sign-flip test on the 0/1 indicators, Holm across tricks) decides the verdict instead.",
        f"**Seeds needed** (a range): the seeds a paired t-test at level {ALPHA}/m (m = tricks, Holm's strictest "
        f"step) needs for {POWER:.0%} power (noncentral t), for the effect sizes d_z in the "
        f"{SEEDS_NEEDED_CONFIDENCE:.0%} confidence interval of d_z: the low end if the effect is as large as the data "
        "allow, the high end if as small (≥ n: it may be 0); — when the data say nothing either way.",
        "**Diverged runs** (non-finite loss) have no final metric: every pair (factorial: every seed block) with a "
        "diverged run is left out of the metric effects and counted as *excl. (div.)*; divergence rates are "
        "reported under Stability.",
        "**Stability.** Spread ratio = Gini mean difference (mean |difference| between two seeds) of the primary "
        "metric with the trick on / off (for normal metrics the ratio of standard deviations), with a jackknife "
        "t-interval of the log ratio (calibrated from 3 seeds); with one arm a side, ✱ marks a change of spread that "
        "the exact within-seed swap test confirms (p < 0.05, possible from 6 seeds); loss spikes = steps whose "
        "log-loss exceeds the trailing 25-step median by 5 robust standard deviations. **Cost**: per-seed ratio "
        "on / off of train time and peak memory per sample, geometric mean with the t-interval of the mean log "
        "ratio; timings from a shared machine are noisy and CPU memory is sampled "
        "resident-set growth (approximate).",
    ]


def write_report(gdir: Path, stats: GridStats | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` and ``effects.csv`` of grid folder ``gdir``.

    Returns the path of ``report.md``. Safe to call on a grid that is still running (unfinished
    runs are counted, not analysed). Pass ``stats`` (``analyze_grid(gdir)``) to reuse an analysis.
    """
    gdir = Path(gdir)
    gs = stats if stats is not None else analyze_grid(gdir)
    # only the runs of the spec as launched last (a changed spec keeps older runs on disk)
    runs, curves, train_curves = (
        df[df["run_id"].isin(gs.run_ids)] if len(df) else df
        for df in (store.load_grid(gdir), store.load_curves(gdir), store.load_curves(gdir, "train"))
    )
    figdir = gdir / "figures"
    figdir.mkdir(exist_ok=True)
    doc = _Doc()
    doc.heading(1, f"trickbench report: {gs.grid}")
    if gs.description:
        doc.para(gs.description)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(gs.status_counts.items()))
    doc.para(f"design `{gs.design}`, {len(gs.seeds)} seeds, {gs.n_cells} runs ({counts}).")
    if gs.damaged:
        doc.para(
            f"**{len(gs.damaged)} damaged run{'s' * (len(gs.damaged) > 1)} left out of this analysis** (a file "
            "cannot be read or does not match what the run recorded); the next `bench run` moves each aside "
            "to `quarantine/` and trains it again:"
        )
        doc.bullets([f"`{rid}` {why}" for rid, why in gs.damaged.items()])
    doc.heading(2, "Summary")
    doc.table(*_summary_rows(gs))
    doc.heading(2, "How to read this report")
    doc.bullets(_methods(gs))
    for ts in gs.tasks:
        tr = runs[runs["task"] == ts.label] if len(runs) else runs
        tc = curves[curves["task"] == ts.label] if len(curves) else curves
        tt = train_curves[train_curves["task"] == ts.label] if len(train_curves) else train_curves
        _task_section(doc, ts, tr, tc, tt, gdir, figdir)
    frames = [ts.effects.assign(task=ts.label) for ts in gs.tasks if len(ts.effects)]
    if frames:
        store.atomic_write_text(gdir / "effects.csv", pd.concat(frames).drop(columns="seeds").to_csv(index=False))
    store.atomic_write_text(gdir / "report.md", doc.markdown() + "\n")
    store.atomic_write_text(gdir / "report.html", doc.html(f"trickbench report: {gs.grid}"))
    return gdir / "report.md"


def _summary_rows(gs: GridStats) -> tuple[list[str], list[list[str]]]:
    header = ["task", "trick", "verdict", "effect on primary metric [95% CI]", "p (Holm)", "seeds improved",
              "seeds needed", "time ×", "memory ×"]  # fmt: skip
    rows = []
    for ts in gs.tasks:
        for _, v in ts.verdicts.iterrows():
            rows.append(
                [
                    ts.label,
                    v["term"] + (f" (+{v['aliases']})" if v["aliases"] else ""),
                    f"**{v['verdict']}**",
                    _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]) + f" ({ts.metric})" * _finite(v["mean"]),
                    _p(v["p_holm"]),
                    _frac(v["frac_improved"], v["n"]),
                    _seeds_range(v),
                    _g(v["time_ratio"]),
                    _g(v["memory_ratio"]),
                ]
            )
    return header, rows


def _task_section(
    doc: _Doc,
    ts: TaskStats,
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    train: pd.DataFrame,
    gdir: Path,
    figdir: Path,
) -> None:
    doc.heading(2, f"{ts.label}")
    doc.para(
        f"task `{ts.task}`, tricks: {', '.join(f'`{t}`' for t in ts.tricks) or '(none)'}; "
        f"primary metric `{ts.metric}` ({_direction(ts.higher_is_better)}); reference arm "
        + (f"`{ts.reference_arm}`." if ts.reference_arm else "none (this fraction has no all-off arm).")
    )
    if not len(runs) or not (runs["status"].isin(store.RunStatus.FINISHED)).any():
        doc.para("(no finished runs yet)")
        return
    base = ts.label

    doc.heading(3, "Verdicts")
    header = ["trick", "verdict", f"effect on {ts.metric} [95% CI]", "p", "p (Holm)", "seeds improved",
              "n (excl. div.)", "seeds needed", "time ×", "memory ×", "why"]  # fmt: skip
    rows = []
    for _, v in ts.verdicts.iterrows():
        rows.append(
            [
                v["term"] + (f" (+{v['aliases']})" if v["aliases"] else ""),
                f"**{v['verdict']}**",
                _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]),
                _p(v["p"]),
                _p(v["p_holm"]),
                _frac(v["frac_improved"], v["n"]),
                f"{int(v['n'])} ({int(v['n_excluded_diverged'])})",
                _seeds_range(v),
                _g(v["time_ratio"]),
                _g(v["memory_ratio"]),
                v["reason"],
            ]
        )
    doc.table(header, rows)
    for note in ts.notes:
        doc.para(note)

    doc.heading(3, "Arms")
    _arms_table(doc, ts)

    doc.heading(3, "Effects on every metric")
    _effects_table(doc, ts)
    path = plots.forest_plot(ts, figdir / f"{base}_forest.png")
    doc.figure(f"{ts.label}: forest plot of paired effects (one row per trick)", path)

    doc.heading(3, "Learning curves")
    if len(curves) or len(train):
        path = learning_curves(curves, train, ts, figdir / f"{base}_learning_curves.png", [a for a, _ in ts.arms])
        doc.figure(f"{ts.label}: learning curves per arm (mean over seeds, band = seed range)", path)
    else:
        doc.para("(no curves stored)")

    doc.heading(3, "Stability")
    _stability_table(doc, ts)
    doc.figure(f"{ts.label}: stability", plots.stability_chart(ts, figdir / f"{base}_stability.png"))

    doc.heading(3, "Cost")
    _cost_table(doc, ts)
    doc.figure(f"{ts.label}: cost relative to the trick off", plots.cost_chart(ts, figdir / f"{base}_cost.png"))

    if ts.design.endswith("factorial") and len(ts.tricks) >= 2:
        doc.heading(3, "Interactions")
        _interactions(doc, ts)
        path = plots.interaction_heatmap(ts, figdir / f"{base}_interactions.png")
        doc.figure(f"{ts.label}: main effects and two-way interactions of {ts.metric}", path)

    doc.heading(3, "Outputs")
    _outputs(doc, ts, runs, gdir, figdir)


def _arms_table(doc: _Doc, ts: TaskStats) -> None:
    summary = ts.arm_summary
    metric_cols = [c.removesuffix(".mean") for c in summary.columns if c.startswith("metric.") and c.endswith(".mean")]
    ref = summary[summary["arm"] == ts.reference_arm]
    ref_time = ref["cost.train_s_per_sample.mean"].iloc[0] if len(ref) else float("nan")
    by_trick = {}
    if ts.design == "one_at_a_time":
        by_trick = {f"+{t}": t for t in ts.tricks}
    elif ts.design == "leave_one_out":
        by_trick = {f"all-{t}": t for t in ts.tricks}
    verdicts = ts.verdicts.set_index("term") if len(ts.verdicts) else pd.DataFrame()
    metric_names = [c.removeprefix("metric.") + " (mean ± std)" for c in metric_cols]
    header = ["arm", "completed / diverged / other", *metric_names, "train s/sample vs ref"]
    if by_trick:
        header += ["trick", "verdict", f"effect on {ts.metric}", "p (Holm)", "seeds improved"]
    rows = []
    for _, a in summary.iterrows():
        rel = a["cost.train_s_per_sample.mean"] / ref_time if _finite(ref_time) and ref_time > 0 else float("nan")
        row = [
            a["arm"] + (" (reference)" if a["arm"] == ts.reference_arm else ""),
            f"{a['completed']} / {a['diverged']} / {a['other']}",
            *[_mean_std(a[f"{c}.mean"], a[f"{c}.std"]) for c in metric_cols],
            f"{rel:.3g}×" if _finite(rel) else "—",
        ]
        if by_trick:
            t = by_trick.get(a["arm"])
            if t is not None and t in verdicts.index:
                v = verdicts.loc[t]
                row += [t, v["verdict"], _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]), _p(v["p_holm"]),
                        _frac(v["frac_improved"], v["n"])]  # fmt: skip
            else:
                row += [""] * 5
        rows.append(row)
    doc.table(header, rows)
    note = "mean ± std over the completed runs of each arm"
    if ts.design == "leave_one_out":
        note += "; the row of `all-t` carries the verdict on trick t (effect = all − all-t)"
    doc.para(note + ".")


def _effects_table(doc: _Doc, ts: TaskStats) -> None:
    eff = ts.effects
    if not len(eff):
        doc.para("(no effects: no pairs of finished runs)")
        return
    header = ["trick / term", "metric", "n", "excl. (div.)", "effect [95% CI]", "p", "p (Holm)", "q (BH)",
              "seeds improved"]  # fmt: skip
    rows = []
    for _, r in eff.sort_values(["kind", "metric"], key=lambda s: s.map(_sort_key)).iterrows():
        hib = r["higher_is_better"]
        direction = "" if hib is None or (isinstance(hib, float) and math.isnan(hib)) else (" ↑" if hib else " ↓")
        rows.append(
            [
                r["term"] + (f" (+{r['aliases']})" if r["aliases"] else ""),
                _metric_label(r["metric"], ts.metric) + direction,
                str(int(r["n"])),
                str(int(r["n_excluded_diverged"])),
                _effect(r["mean"], r["ci_low"], r["ci_high"], r["n"]),
                _p(r["p"]),
                _p(r["p_holm"]),
                _p(r["q_bh"]),
                _frac(r["frac_improved"], r["n"]),
            ]
        )
    doc.table(header, rows)
    doc.para("↑ higher is better, ↓ lower is better (no arrow: no preferred direction). Effects are on − off.")


_STABILITY_LABELS = {
    "stability.loss_spikes": "loss spikes (count)",
    "stability.late_roughness": "late roughness of log train loss",
    "stability.final_train_loss": "final train loss",
}


def _metric_label(col: str, primary: str) -> str:
    """Display name of an effects-table metric column."""
    if col == "stability.best_metric":
        return f"best {primary} during training"
    return _STABILITY_LABELS.get(col, col.removeprefix("metric."))


def _sort_key(v: Any) -> Any:
    order = {"main": 0, "interaction": 1}
    if v in order:
        return order[v]
    return (0 if str(v).startswith("metric.") else 1, str(v))


def _stability_table(doc: _Doc, ts: TaskStats) -> None:
    st = ts.stability
    if not len(st):
        doc.para("(no stability statistics)")
        return
    header = ["trick", f"seed spread (Gini mean difference) of {ts.metric}, on / off [95% CI]",
              "loss spikes per run, on vs off", "Δ spikes [95% CI]", "diverged runs, on vs off",
              "Δ divergence rate [95% CI]", "p (Holm)"]  # fmt: skip
    rows = []
    for _, r in st.iterrows():
        g = r.get
        rows.append(
            [
                r["term"],
                _ratio(g("spread_ratio"), g("spread_low"), g("spread_high")) + " ✱" * bool(g("spread_changed")),
                f"{_g(g('spikes_on'))} vs {_g(g('spikes_off'))}",
                _effect(g("spikes_diff"), g("spikes_low"), g("spikes_high"), g("spikes_n")),
                f"{_seeds(g('diverged_total_on'))} vs {_seeds(g('diverged_total_off'))}",
                _effect(g("diverged_diff"), g("diverged_low"), g("diverged_high"), g("diverged_n")),
                _p(g("diverged_p_holm")),
            ]
        )
    doc.table(header, rows)


def _cost_table(doc: _Doc, ts: TaskStats) -> None:
    c = ts.cost
    if not len(c):
        doc.para("(no cost statistics)")
        return
    header = ["trick", "train time per sample, on / off [95% CI]", "peak memory per sample, on / off [95% CI]", "n"]
    rows = [
        [
            r["term"],
            _ratio(r["time_ratio"], r["time_low"], r["time_high"]),
            _ratio(r["memory_ratio"], r["memory_low"], r["memory_high"]),
            str(int(r["time_n"])),
        ]
        for _, r in c.iterrows()
    ]
    doc.table(header, rows)


def _interactions(doc: _Doc, ts: TaskStats) -> None:
    if ts.design == "fractional_factorial":
        doc.para(
            f"Fractional design 2^({len(ts.tricks)}−{ts.fraction}) of resolution "
            f"**{ts.resolution}** (minimum aberration); generators: "
            f"{', '.join(f'`{g}`' for g in ts.defining_relation)}; defining relation: "
            f"{', '.join(f'`{w}`' for w in ts.defining_words)} (words of length 3, 4, ...: "
            f"{', '.join(str(a) for a in ts.word_length_pattern)}). Effects with the same contrast are aliased "
            "(listed with each term); three-factor and higher interactions are assumed negligible."
        )
        if ts.alias_structure:
            aliases = "; ".join(f"`{a}`" for a in ts.alias_structure)
            doc.para(f"Aliases among main effects and two-factor interactions: {aliases}.")
    doc.para(
        "Two-way interaction a×b = half the change of a's effect when b is switched on (±1 coding, per seed); "
        "positive and negative values are in the metric's units."
    )
    inter = ts.interactions
    if not len(inter):
        doc.para("(no estimable two-way interactions)")
        return
    header = ["interaction", "aliased with", "n", f"effect on {ts.metric} [95% CI]", "p", "p (Holm)"]
    rows = [
        [
            r["term"],
            r["aliases"] or "—",
            str(int(r["n"])),
            _effect(r["mean"], r["ci_low"], r["ci_high"], r["n"]),
            _p(r["p"]),
            _p(r["p_holm"]),
        ]
        for _, r in inter.iterrows()
    ]
    doc.table(header, rows)


def _output_arms(ts: TaskStats) -> list[str]:
    labels = [a for a, _ in ts.arms]
    if ts.design in ("one_at_a_time", "leave_one_out"):
        return labels[:MAX_OUTPUT_ARMS]
    singles = [a for a, on in ts.arms if len(on) <= 1]
    return (singles if len(singles) > 1 else labels)[:MAX_OUTPUT_ARMS]


def _outputs(doc: _Doc, ts: TaskStats, runs: pd.DataFrame, gdir: Path, figdir: Path) -> None:
    """The task's own pictures of its outputs (render_outputs) for the reference and each trick arm, one seed."""
    arms = _output_arms(ts)
    done = runs[runs["status"] == store.RunStatus.COMPLETED]
    have = {
        (r.arm, int(r.seed)): gdir / "runs" / r.run_id
        for r in done.itertuples()
        if (gdir / "runs" / r.run_id / "final_model.pt").exists()
    }
    if not have:
        doc.para("(no completed run with a saved final model)")
        return
    seed = max(ts.seeds, key=lambda s: (sum((a, s) in have for a in arms), -ts.seeds.index(s)))
    panels, problems = [], []
    for arm in arms:
        rdir = have.get((arm, seed))
        if rdir is None:
            continue
        out = figdir / f"{ts.label}_outputs_{re.sub(r'[^A-Za-z0-9_.+-]', '_', arm)}.png"
        try:
            written = _render_run(rdir, out)
        except Exception as exc:  # a broken run must not stop the report
            problems.append(f"`{arm}`: {exc!r} ({traceback.format_exc(limit=1).splitlines()[-1]})")
            continue
        if not written:
            doc.para(f"(task `{ts.task}` draws no outputs: its `render_outputs` is not implemented)")
            return
        row = done[(done["arm"] == arm) & (done["seed"] == seed)]
        value = row[f"metric.{ts.metric}"].iloc[0] if f"metric.{ts.metric}" in row else float("nan")
        panels.append((f"{arm} — seed {seed} — {ts.metric} = {_g(value, 4)}", out))
    if panels:
        path = plots.outputs_figure(panels, figdir / f"{ts.label}_outputs.png", f"{ts.label}: outputs, seed {seed}")
        doc.figure(f"{ts.label}: outputs of the reference arm and each trick arm (seed {seed})", path)
    for p in problems:
        doc.para(f"outputs not drawn for {p}")


def _render_run(rdir: Path, out: Path) -> bool:
    """Rebuild a run's task and final model on the CPU and let the task draw its outputs to ``out``."""
    import torch

    from bench.loop import build_task
    from bench.seeds import SeedBundle

    meta = store.read_json(rdir / store.CONFIG)
    cfg = meta["config"]
    task, _ = build_task(cfg, SeedBundle(meta["seed"]), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):  # building consumes the global RNG; the weights are replaced anyway
        model = task.build_model()
    model.load_state_dict(torch.load(rdir / "final_model.pt", map_location="cpu", weights_only=True))
    model.eval()
    return bool(task.render_outputs(model, out))


def terminal_summary(gdir: Path, stats: GridStats | None = None) -> str:
    """A short text table (task, trick, verdict, effect ± CI, p, cost ratio) to print at the end of a run."""
    gs = stats if stats is not None else analyze_grid(Path(gdir))
    header = ["task", "trick", "verdict", "effect [95% CI]", "p(Holm)", "improved", "time×", "mem×", "seeds"]
    rows = []
    for ts in gs.tasks:
        for _, v in ts.verdicts.iterrows():
            rows.append(
                [
                    ts.label,
                    v["term"] + (f" (+{v['aliases']})" if v["aliases"] else ""),
                    v["verdict"],
                    _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]) + f" {ts.metric}" * _finite(v["mean"]),
                    _p(v["p_holm"]),
                    _frac(v["frac_improved"], v["n"]),
                    _g(v["time_ratio"]),
                    _g(v["memory_ratio"]),
                    _seeds_range(v),
                ]
            )
    damaged = (
        f"\n{len(gs.damaged)} damaged run(s) left out (see `bench status`; `bench run` retrains them)"
        if gs.damaged
        else ""
    )
    if not rows:
        return f"grid {gs.grid}: no trick effects to summarise yet" + damaged
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"effect = on − off, paired by seed; {CONFIDENCE:.0%} t-interval († not calibrated); "
        f"seeds = range needed for a verdict ({POWER:.0%} power)"
    )
    return "\n".join(lines) + damaged
