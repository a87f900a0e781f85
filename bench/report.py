"""Reports of a grid: ``report.md``, a self-contained ``report.html``, ``figures/``, ``effects.csv``, ``report.json``.

Called at the end of ``bench run`` and by ``bench report`` (:func:`write_report`);
:func:`terminal_summary` is the short table printed after a run. Reads only the store and
the stored spec; all numbers come from :mod:`bench.stats`, all figures from :mod:`bench.plots`.
Re-writing a report replaces these files; nothing else in the grid folder changes, except that
each run's rendered outputs picture is kept in its run folder the first time it is drawn
(``outputs.png``, see :func:`cached_outputs`), so that the report of a finished grid imports
neither torch nor a task module afterwards.

The page answers first: per task, the tricks sorted by effect, the effect as % of the metric with
the trick off with its interval, coloured by verdict, then one overview figure of every task's
standardised effects; the details (verdict reasons, arms, every metric, curves, stability, cost,
interactions, outputs) follow a table of contents.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import secrets
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench import plots, store
from bench.plots import VERDICT_COLORS, arm_color, effect_gain, learning_curves
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

__all__ = ["arm_color", "cached_outputs", "terminal_summary", "write_report"]

OUTPUTS_PNG, OUTPUTS_META = "outputs.png", "outputs.json"  # a run's rendered outputs, cached in its folder
#: what a verdict class is called on the first screen (bench.stats.verdict_class)
CLASS_LABELS = {
    "helps": "helps",
    "hurts": "hurts",
    "no effect": "no effect",
    "unclear": "unclear",
    "too few seeds": "too few seeds",
    "no data": "no usable pairs",
}
CLASS_MEANING = {
    "helps": f"better with the trick, p (Holm) < {ALPHA}",
    "hurts": f"worse with the trick, p (Holm) < {ALPHA}",
    "no effect": f"not significant and |d_z| < {MIN_EFFECT_SIZE} (any effect is small next to the seed noise)",
    "unclear": "a test was possible and is inconclusive: needs more seeds",
    "too few seeds": f"fewer than {MIN_TEST_SEEDS} usable seeds: no test is possible",
    "no data": "no seed where both runs of the comparison completed",
}


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


def _pct_number(x: float) -> str:
    return f"{x:+.2f}" if abs(x) < 1 else f"{x:+.3g}"  # no 6.8e-05: below 1 % two decimals say enough


def _pct(pct: Any, lo: Any, hi: Any) -> str:
    if not _finite(pct):
        return "—"
    ci = f" [{_pct_number(lo)}, {_pct_number(hi)}]" if _finite(lo) and _finite(hi) else ""
    return f"{_pct_number(pct)}%{ci}"


def _ratio(r: Any, lo: Any = None, hi: Any = None, approx: bool = False) -> str:
    if not _finite(r):
        return "—"
    return ("≈" if approx else "") + f"{r:.3g}×" + (f" [{lo:.3g}, {hi:.3g}]" if _finite(lo) else "")


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


# --- a tiny document model: written once, rendered as markdown, as HTML and as JSON ---------------------------
@dataclass(frozen=True)
class _Cell:
    """A table cell with a class (the verdict colour in HTML; bold in markdown)."""

    text: str
    cls: str = ""

    def __str__(self) -> str:
        return self.text


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-") or "section"  # as GitHub writes anchors
    slug, n = base, 1
    while slug in used:
        n += 1
        slug = f"{base}-{n}"
    used.add(slug)
    return slug


@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figure_data: list[dict[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def warn(self, text: str) -> None:
        self.blocks.append(("warn", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[Any]], cls: str = "") -> None:
        self.blocks.append(("table", (header, rows, cls)))

    def figure(self, title: str, path: Path | None) -> None:
        """A figure (its PNG embedded in the HTML; its vector files linked from the markdown); None: nothing."""
        if path is None:
            return
        self.blocks.append(("fig", (title, path)))
        sidecar = path.with_suffix(".json")
        data = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        self.figure_data.append({"title": title, "file": path.name, **data})

    def toc(self) -> None:
        """The table of contents of the headings after this point (level 2 and 3)."""
        self.blocks.append(("toc", None))

    def _anchors(self) -> list[str]:
        used: set[str] = set()
        return [_slug(body[1], used) if kind == "h" else "" for kind, body in self.blocks]

    def _toc_entries(self, i: int, anchors: list[str]) -> list[tuple[int, str, str]]:
        return [
            (body[0], body[1], anchors[j])
            for j, (kind, body) in enumerate(self.blocks)
            if j > i and kind == "h" and body[0] in (2, 3)
        ]

    def markdown(self) -> str:
        out: list[str] = []
        anchors = self._anchors()
        for i, (kind, body) in enumerate(self.blocks):
            if kind == "h":
                out += ["#" * body[0] + " " + body[1], ""]
            elif kind == "p":
                out += [body, ""]
            elif kind == "warn":
                out += [f"> ⚠ {body}", ""]
            elif kind == "ul":
                out += [f"- {item}" for item in body] + [""]
            elif kind == "toc":
                out += ["**Contents**", ""]
                out += [f"{'  ' * (lvl - 2)}- [{text}](#{a})" for lvl, text, a in self._toc_entries(i, anchors)]
                out.append("")
            elif kind == "table":
                header, rows, _ = body
                cell = lambda c: (f"**{c.text}**" if isinstance(c, _Cell) and c.cls else str(c)).replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "fig":
                path = body[1]
                vector = [f"[{ext.upper()}](figures/{path.stem}.{ext})" for ext in ("svg", "pdf")
                          if path.with_suffix(f".{ext}").is_file()]  # fmt: skip
                out += [f"![{body[0]}](figures/{path.name})" + (f" ({' · '.join(vector)})" if vector else ""), ""]
        return "\n".join(out)

    def html(self, title: str) -> str:
        verdict_css = "".join(  # more specific than the striped rows' background
            f"tbody tr td.v-{cls.replace(' ', '-')}{{background:{color}1f;border-left:4px solid {color}}}"
            f"td.v-{cls.replace(' ', '-')} b{{color:{color}}}"
            for cls, color in VERDICT_COLORS.items()
        )
        out = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
            ".tw{overflow-x:auto;max-width:100%;margin:0.5em 0 1.2em}"
            "table{border-collapse:collapse;font-size:0.85em}"
            "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
            "th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}"
            "img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px;overflow-wrap:anywhere}"
            "figure{margin:0.5em 0 1.5em}figcaption{font-size:0.85em;color:#555}"
            ".warn{background:#fff8c5;border-left:4px solid #bf8700;padding:0.4em 0.8em}"
            "nav.toc{font-size:0.9em;columns:2 22em;background:#f6f8fa;padding:0.5em 1em}"
            "nav.toc ul{margin:0;padding-left:1.2em}table.summary td{white-space:nowrap}"
            "table.summary td:first-child{white-space:normal}" + verdict_css + "</style></head><body>",
        ]
        anchors = self._anchors()
        for i, (kind, body) in enumerate(self.blocks):
            if kind == "h":
                out.append(f"<h{body[0]} id='{anchors[i]}'>{_inline(body[1])}</h{body[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(body)}</p>")
            elif kind == "warn":
                out.append(f"<p class='warn'>⚠ {_inline(body)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body) + "</ul>")
            elif kind == "toc":
                items, level = [], 2
                for lvl, text, a in self._toc_entries(i, anchors):
                    items.append(("<ul>" if lvl > level else "</ul>" if lvl < level else "")
                                 + f"<li><a href='#{a}'>{_inline(text)}</a></li>")  # fmt: skip
                    level = lvl
                items.append("</ul>" if level > 2 else "")
                out.append("<nav class='toc'><b>Contents</b><ul>" + "".join(items) + "</ul></nav>")
            elif kind == "table":
                header, rows, cls = body
                out.append(f"<div class='tw'><table{f' class={cls!r}' if cls else ''}><thead><tr>")
                out.append("".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead><tbody>")
                out.append("".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows))
                out.append("</tbody></table></div>")
            elif kind == "fig":
                b64 = base64.b64encode(body[1].read_bytes()).decode()
                alt = html.escape(body[0], quote=True)
                out.append(
                    f"<figure><img alt='{alt}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{_inline(body[0])}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)

    def data(self) -> dict[str, Any]:
        """Every table (with the heading it is under) and every figure's panel data, for scripts and tests."""
        tables, section = [], ""
        for kind, body in self.blocks:
            if kind == "h":
                section = body[1]
            elif kind == "table":
                header, rows, _ = body
                tables.append({"section": section, "header": header, "rows": [[str(c) for c in r] for r in rows]})
        return {"tables": tables, "figures": self.figure_data}


def _td(c: Any) -> str:
    if isinstance(c, _Cell) and c.cls:
        return f"<td class='v-{c.cls.replace(' ', '-')}'><b>{_inline(c.text)}</b></td>"
    return f"<td>{_inline(str(c))}</td>"


def _inline(text: str) -> str:
    """Markdown's inline `code`, **bold** and *italic* as HTML (everything else escaped)."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])", r"<i>\1</i>", s)


# --- the report ------------------------------------------------------------------------------------------------
def _methods(gs: GridStats) -> list[str]:
    return [
        "**Pairing.** Seed *s* of every arm shares one seed bundle (init, data order, augmentation, noise), so "
        "each effect is computed per seed: **effect = metric with the trick on − with it off, same seed**. "
        "one_at_a_time: `+trick − baseline`; leave_one_out: `all − all-trick` (what the trick adds to the full "
        "recipe); factorial designs: the ±1-coded contrast per seed (mean of the arms with the trick on − mean of "
        "those with it off; seed is a blocking factor). Only seeds where every run of a comparison completed "
        "count (*completed pairs*); a trick without one gets no verdict.",
        "**Effect in %** (first screen): the mean effect and its interval divided by the mean of the metric with "
        "the trick off over the same seeds (the baseline's uncertainty is not in that interval). **d_z** "
        "(overview figure): the mean effect divided by the standard deviation of the per-seed differences, with "
        f"its {CONFIDENCE:.0%} interval (noncentral t), oriented so that positive = better; it puts tasks with "
        "different metrics on one scale.",
        f"**Interval.** {CONFIDENCE:.0%} paired t-interval of the mean difference over seeds. Its coverage is "
        "measured in CI (tests/test_calibration.py): 93.9–96.6% at 2 to 20 seeds on normal, heavy-tailed (t₃), "
        "lognormal, skewed and outlier-prone simulated metrics; strongly skewed differences (skewness ≥ 2) cover "
        f"less (88–92%). An interval needs {MIN_TEST_SEEDS} seeds; † marks one that is not calibrated.",
        "**p-value.** Paired t-test of the mean difference, the test the interval inverts (so p < 0.05 exactly when "
        "the 95% interval excludes 0); **p (Holm)** adjusts across the tricks of a task, per metric "
        "(Benjamini–Hochberg q and the exact sign-flip permutation p in effects.csv).",
        f"**Verdict** (primary metric, direction-aware): **helps** / **hurts** when p (Holm) < {ALPHA} (the interval "
        f"then excludes 0 on that side); **no detectable effect** when not significant and the {CONFIDENCE:.0%} "
        f"interval of the effect size d_z lies within ±{MIN_EFFECT_SIZE} (any effect is small next to the seed "
        f"noise); otherwise **needs more seeds** (*unclear* on the first screen; *too few seeds* when fewer than "
        f"{MIN_TEST_SEEDS} seeds allow no test). A significant change of the divergence rate (exact sign-flip test "
        "on the 0/1 indicators, Holm across tricks) decides the verdict instead.",
        f"**Seeds needed** (a range): the seeds a paired t-test at level {ALPHA}/m (m = tricks, Holm's strictest "
        f"step) needs for {POWER:.0%} power (noncentral t), for the effect sizes d_z in the "
        f"{SEEDS_NEEDED_CONFIDENCE:.0%} confidence interval of d_z: the low end if the effect is as large as the data "
        "allow, the high end if as small (≥ n: it may be 0); — when the data say nothing either way.",
        "**Diverged runs** (non-finite loss) have no final metric: every pair (factorial: every seed block) with a "
        "diverged run is left out of the metric effects and counted as *excl. (div.)*; divergence rates are "
        "reported under Stability.",
        "**Stability.** Spread ratio = Gini mean difference (mean |difference| between two seeds) of the primary "
        "metric with the trick on / off (for normal metrics the ratio of standard deviations), with a jackknife "
        "t-interval of the log ratio (calibrated from 3 seeds: 94–96 % coverage, 91–95 % on strongly skewed, "
        "lognormal-like metrics); with one arm a side, ✱ marks a change of spread that "
        "the exact within-seed swap test confirms (p < 0.05, possible from 6 seeds); loss spikes = steps whose "
        "log-loss exceeds the trailing 25-step median by 5 robust standard deviations.",
        "**Cost** (one definition in every table): per seed, the cost with the trick on / off (the Arms table: the "
        "arm / the reference arm), geometric mean over seeds with the t-interval of the mean log ratio. The "
        "executors run the arms of a seed next to each other (seed-major, order reversed on every other seed), so "
        "a machine load that drifts during a grid falls on both sides of each ratio. Peak memory on a GPU is the "
        "allocator's exact peak; on a CPU it is sampled heap growth, marked ≈ (approximate), and never part of a "
        "verdict.",
        "**Learning curves** use one estimator at every point: a task that measures its final metric on a larger "
        "sample (e.g. toy_diffusion's sliced Wasserstein distance) records the last curve point the way it "
        "measures the intermediate ones; result.json (and every table) has the final estimator's value.",
    ]


def write_report(gdir: Path, stats: GridStats | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``report.json``, ``figures/`` and ``effects.csv`` of grid folder ``gdir``.

    Returns the path of ``report.md``. Safe to call on a grid that is still running (unfinished
    runs are counted, not analysed). Pass ``stats`` (``analyze_grid(gdir)``) to reuse an analysis.
    """
    gdir = Path(gdir)
    gs = stats if stats is not None else analyze_grid(gdir)
    runs = gs.runs
    curves, train_curves = (
        df[df["run_id"].isin(gs.run_ids)] if len(df) else df
        for df in (store.load_curves(gdir), store.load_curves(gdir, "train"))
    )
    figdir = gdir / "figures"
    figdir.mkdir(exist_ok=True)
    plots.set_trick_order([t for ts in gs.tasks for t in ts.tricks])
    doc = _Doc()
    doc.heading(1, f"trickbench report: {gs.grid}")
    if gs.description:
        doc.para(gs.description)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(gs.status_counts.items()))
    doc.para(f"design `{gs.design}`, {len(gs.seeds)} seeds, {gs.n_cells} runs ({counts}).")
    _warnings(doc, gs)
    _adaptive(doc, gdir)
    _answer(doc, gs, figdir)
    doc.toc()
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
    store.atomic_write_json(gdir / "report.json", {"grid": gs.grid, **doc.data()})
    return gdir / "report.md"


def _adaptive_rows(gdir: Path) -> tuple[list[list[str]], str] | None:
    """The sequential decisions of an adaptive grid (``bench run --until-decisive``), or None for a fixed grid."""
    from bench.adaptive import state_summary

    state = state_summary(gdir)
    if not state or not state.get("decisions"):
        return None
    rows = []
    for label, arms in state["decisions"].items():
        for arm, d in arms.items():
            interval = f"[{_g(d['low'])}, {_g(d['high'])}]" if _finite(d["low"]) else "—"
            rows.append([label, arm, d["verdict"], str(d["n"]), f"{_g(d['mean'])} {interval}", d["reason"]])
    spent = f"{state.get('runs_spent', '?')} runs trained of a fixed design's {state.get('runs_fixed_design', '?')}"
    return rows, spent


def _adaptive(doc: _Doc, gdir: Path) -> None:
    """An adaptive grid's answer: the sequential decisions, with the note that fixed-n numbers below are descriptive."""
    found = _adaptive_rows(gdir)
    if found is None:
        return
    rows, spent = found
    doc.heading(2, "Adaptive seeds: the decisions")
    doc.para(
        "This grid ran in rounds (`bench run --until-decisive`): an arm stopped as soon as its group-sequential "
        "repeated interval (family-wise α = 0.05 per task, valid under the stopping) was decisive. These decisions "
        f"are the grid's claims; {spent}. The fixed-n intervals, p-values and verdicts further down are computed "
        "as if the seeds had been fixed in advance: after data-dependent stopping they are descriptive only."
    )
    doc.table(["task", "arm", "decision", "seeds", "Δ [repeated interval]", "why it stopped"], rows)


def _warnings(doc: _Doc, gs: GridStats) -> None:
    """What the reader must know before trusting a number: damaged, out-of-spec and stale runs, mixed code."""
    if gs.damaged:
        doc.warn(
            f"**{len(gs.damaged)} damaged run{'s' * (len(gs.damaged) > 1)} left out of this analysis** (a file "
            "cannot be read or does not match what the run recorded); the next `bench run` moves each aside "
            "to `quarantine/` and trains it again:"
        )
        doc.bullets([f"`{rid}` {why}" for rid, why in gs.damaged.items()])
    if gs.out_of_spec:
        doc.warn(
            f"{gs.out_of_spec} run{'s' * (gs.out_of_spec > 1)} in this folder belong{'s' * (gs.out_of_spec == 1)} "
            "to an earlier version of the spec and are left out (`in_spec` is false for them in summary.csv and "
            "`bench.store.load_grid`)."
        )
    for ts in gs.tasks:
        if ts.code_mixed:
            versions = "; ".join(f"{n} versions of {part}" for part, n in ts.code_versions.items())
            stale = (
                f"{ts.stale_runs} runs trained by other code than today's ({'; '.join(ts.stale_parts)} "
                "changed): `bench run --rerun-stale` retrains them"
                if ts.stale_runs
                else ""
            )
            what = "; ".join(x for x in (versions, stale) if x)
            doc.warn(f"**{ts.label}: this comparison mixes code versions** ({what}); tricks marked ⚠ are affected.")
    if gs.tasks and not gs.usable_pairs and any(not ts.baseline_only for ts in gs.tasks):
        doc.warn(
            "**No verdicts: no usable pairs.** No trick has a seed where both runs of its comparison completed "
            f"(runs: {', '.join(f'{n} {s}' for s, n in sorted(gs.status_counts.items()))})."
        )


def _answer(doc: _Doc, gs: GridStats, figdir: Path) -> None:
    """The first screen: per task the tricks sorted by effect, coloured by verdict; then the overview figure."""
    doc.heading(2, "Answer")
    legend = "; ".join(f"**{CLASS_LABELS[c]}**: {CLASS_MEANING[c]}" for c in CLASS_LABELS)
    doc.para(
        "Per task, each trick's effect on the primary metric with its "
        f"{CONFIDENCE:.0%} interval, in % of the metric with the trick off (same seeds), best first. {legend}."
    )
    for ts in gs.tasks:
        title = f"{ts.label}: {ts.metric}, {_direction(ts.higher_is_better)}"
        if ts.baseline_only:
            doc.heading(3, title)
            doc.para(_baseline_only_line(ts))
            continue
        doc.heading(3, title)
        if not ts.usable_pairs:
            doc.para(
                "**no usable pairs**: no seed where both runs of a comparison completed "
                f"({_status_line(ts)}); no verdicts."
            )
            continue
        header = ["trick", "verdict", f"Δ {ts.metric}, % of trick off [{CONFIDENCE:.0%} CI]", "p (Holm)",
                  "seeds improved", "seeds for a verdict", "time ×", "memory ×"]  # fmt: skip
        rows = []
        order = sorted(ts.verdicts.iterrows(), key=lambda kv: -effect_gain(kv[1], ts.higher_is_better))
        for _, v in order:
            effect = _pct(v["effect_pct"], v["effect_pct_low"], v["effect_pct_high"])
            if effect == "—" and _finite(v["mean"]):  # no usable base value: the effect in the metric's units
                effect = _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]) + f" ({ts.metric})"
            rows.append(
                [
                    v["term"] + (f" (+{v['aliases']})" if v["aliases"] else "") + (" ⚠ mixed code" * v["code_mixed"]),
                    _Cell(CLASS_LABELS[v["verdict_class"]], v["verdict_class"]),
                    effect,
                    _p(v["p_holm"]),
                    _frac(v["frac_improved"], v["n"]),
                    _seeds_range(v),
                    _ratio(v["time_ratio"]),
                    _ratio(v["memory_ratio"], approx=bool(v["memory_approximate"])),
                ]
            )
        doc.table(header, rows, cls="summary")
    path = plots.overview_figure(gs.tasks, figdir / "overview.png")
    if path is not None:
        doc.figure(
            "Overview: every trick of every task on one scale — the standardised paired effect d_z with its "
            f"{CONFIDENCE:.0%} interval, right = better, coloured by verdict (grey band: |d_z| < {MIN_EFFECT_SIZE})",
            path,
        )
    elif any(not ts.baseline_only for ts in gs.tasks):
        doc.para(f"(no overview figure: no trick has {MIN_TEST_SEEDS} usable seeds for an effect size yet)")


def _baseline_only_line(ts: TaskStats) -> str:
    summary = ts.arm_summary
    col = f"metric.{ts.metric}.mean"
    if not len(summary) or col not in summary:
        return "**baseline-only block** (no tricks to compare); no finished runs yet."
    a = summary.iloc[0]
    value = _mean_std(a[col], a[f"metric.{ts.metric}.std"])
    return (
        f"**baseline-only block** (no tricks to compare): {ts.metric} = {value} over {a['completed']} completed "
        "run(s); see its section below."
    )


def _status_line(ts: TaskStats) -> str:
    s = ts.arm_summary
    if not len(s):
        return "no runs"
    return f"{int(s['completed'].sum())} completed, {int(s['diverged'].sum())} diverged, {int(s['other'].sum())} other"


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
        f"task `{ts.task}`, tricks: {', '.join(f'`{t}`' for t in ts.tricks) or '(none: a baseline-only block)'}; "
        f"primary metric `{ts.metric}` ({_direction(ts.higher_is_better)}); reference arm "
        + (f"`{ts.reference_arm}`." if ts.reference_arm else "none (this fraction has no all-off arm).")
    )
    if ts.code_mixed:
        doc.warn(
            "The runs of this task were not all trained by the same code (see the top of the report); "
            "tricks marked ⚠ compare runs of different code."
        )
    if not len(runs) or not (runs["status"].isin(store.RunStatus.FINISHED)).any():
        doc.para("(no finished runs yet)")
        return
    base = ts.label

    if not ts.baseline_only:
        doc.heading(3, f"{ts.label}: verdicts")
        _verdict_table(doc, ts)
        for note in ts.notes:
            doc.para(note)

    doc.heading(3, f"{ts.label}: arms")
    _arms_table(doc, ts)

    if not ts.baseline_only:
        doc.heading(3, f"{ts.label}: effects on every metric")
        _effects_table(doc, ts)
        doc.figure(
            f"{ts.label}: forest plot of paired effects (one panel per metric, one row per trick)",
            plots.forest_plot(ts, figdir / f"{base}_forest.png"),
        )

    doc.heading(3, f"{ts.label}: learning curves")
    path = None
    if len(curves) or len(train):
        path = learning_curves(curves, train, ts, figdir / f"{base}_learning_curves.png", [a for a, _ in ts.arms])
    if path is not None:
        doc.figure(f"{ts.label}: learning curves per arm (mean over seeds, band = seed range)", path)
    else:
        doc.para("(no curves stored)")

    if not ts.baseline_only:
        doc.heading(3, f"{ts.label}: stability")
        _stability_table(doc, ts)
        doc.figure(f"{ts.label}: stability", plots.stability_chart(ts, figdir / f"{base}_stability.png"))

        doc.heading(3, f"{ts.label}: cost")
        _cost_table(doc, ts)
        doc.figure(
            f"{ts.label}: cost relative to the trick off (per-seed ratios)",
            plots.cost_chart(ts, figdir / f"{base}_cost.png"),
        )

    if ts.design.endswith("factorial") and len(ts.tricks) >= 2:
        doc.heading(3, f"{ts.label}: interactions")
        _interactions(doc, ts)
        path = plots.interaction_heatmap(ts, figdir / f"{base}_interactions.png")
        doc.figure(f"{ts.label}: main effects and two-way interactions of {ts.metric}", path)

    doc.heading(3, f"{ts.label}: outputs")
    _outputs(doc, ts, runs, gdir, figdir)


def _verdict_table(doc: _Doc, ts: TaskStats) -> None:
    header = ["trick", "verdict", f"effect on {ts.metric} [95% CI]", "% of trick off", "p", "p (Holm)",
              "seeds improved", "n (excl. div.)", "seeds needed", "time ×", "memory ×", "why"]  # fmt: skip
    rows = []
    for _, v in ts.verdicts.iterrows():
        rows.append(
            [
                v["term"] + (f" (+{v['aliases']})" if v["aliases"] else "") + (" ⚠" * v["code_mixed"]),
                _Cell(v["verdict"], v["verdict_class"]),
                _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]),
                _pct(v["effect_pct"], v["effect_pct_low"], v["effect_pct_high"]),
                _p(v["p"]),
                _p(v["p_holm"]),
                _frac(v["frac_improved"], v["n"]),
                f"{int(v['n'])} ({int(v['n_excluded_diverged'])})",
                _seeds_range(v),
                _ratio(v["time_ratio"], v["time_low"], v["time_high"]),
                _ratio(v["memory_ratio"], v["memory_low"], v["memory_high"], approx=bool(v["memory_approximate"])),
                v["reason"],
            ]
        )
    doc.table(header, rows)


def _arms_table(doc: _Doc, ts: TaskStats) -> None:
    summary = ts.arm_summary
    metric_cols = [c for c in ts.metric_directions if f"{c}.mean" in summary]
    metric_cols = [c for c in metric_cols if summary[f"{c}.mean"].map(_finite).any()]
    approx = ts.memory_approximate
    header = ["arm", "completed / diverged / other", *[c.removeprefix("metric.") for c in metric_cols]]
    has_ref = bool(ts.reference_arm) and not ts.baseline_only
    if has_ref:
        header += [f"time × vs {ts.reference_arm}", f"memory × vs {ts.reference_arm}" + (" (≈)" if approx else "")]
    else:
        header += ["train s / sample"]
    rows = []
    for _, a in summary.iterrows():
        row = [
            a["arm"] + (" (reference)" if a["arm"] == ts.reference_arm and has_ref else ""),
            f"{a['completed']} / {a['diverged']} / {a['other']}",
            *[_mean_std(a[f"{c}.mean"], a[f"{c}.std"]) for c in metric_cols],
        ]
        if has_ref and a["arm"] == ts.reference_arm:
            row += ["1 (reference)", "1 (reference)"]
        elif has_ref:
            row += [_ratio(a["time_ratio"], a["time_low"], a["time_high"]),
                    _ratio(a["memory_ratio"], a["memory_low"], a["memory_high"], approx=approx)]  # fmt: skip
        else:
            row += [_g(a["cost.train_s_per_sample.mean"])]
        rows.append(row)
    doc.table(header, rows)
    note = "metrics: mean ± std over the completed runs of each arm"
    if has_ref:
        note += f"; cost: per-seed ratio to `{ts.reference_arm}`, geometric mean [95% CI] (as in every table)"
    if ts.design == "leave_one_out":
        note += "; the effect of trick t is `all` − `all-t`"
    doc.para(note + ".")


def _effects_table(doc: _Doc, ts: TaskStats) -> None:
    eff = ts.effects
    shown = eff[eff["n"] > 0] if len(eff) else eff
    if not len(shown):
        doc.para("(no effects: no seed where both runs of a comparison completed)")
        return
    header = ["trick / term", "metric", "n", "excl. (div.)", "effect [95% CI]", "p", "p (Holm)", "q (BH)",
              "seeds improved"]  # fmt: skip
    rows = []
    for _, r in shown.sort_values(["kind", "metric"], key=lambda s: s.map(_sort_key)).iterrows():
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
    left = len(eff) - len(shown)
    doc.para(
        "↑ higher is better, ↓ lower is better (no arrow: no preferred direction). Effects are on − off."
        + (f" {left} term × metric combinations without a completed pair are not listed." if left else "")
    )


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
    header = ["trick", f"seed spread (Gini mean difference) of {ts.metric}, on / off [95% CI]",
              "loss spikes per run, on vs off", "Δ spikes [95% CI]", "diverged runs, on vs off",
              "Δ divergence rate [95% CI]", "p (Holm)"]  # fmt: skip
    rows = []
    for _, r in st.iterrows() if len(st) else []:
        g = r.get
        if not any(_finite(g(c)) for c in ("spread_ratio", "spikes_on", "diverged_on")):
            continue  # no pair of finished runs for this trick
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
    if not rows:
        doc.para("(no stability statistics: no seed where both runs of a comparison finished)")
        return
    doc.table(header, rows)


def _cost_table(doc: _Doc, ts: TaskStats) -> None:
    c = ts.cost
    rows = [
        [
            r["term"],
            _ratio(r["time_ratio"], r["time_low"], r["time_high"]),
            _ratio(r["memory_ratio"], r["memory_low"], r["memory_high"], approx=bool(r["memory_approximate"])),
            str(int(r["time_n"])),
        ]
        for _, r in (c.iterrows() if len(c) else [])
        if _finite(r["time_ratio"]) or _finite(r["memory_ratio"])
    ]
    if not rows:
        doc.para("(no cost statistics: no seed where both runs of a comparison finished)")
        return
    memory = "peak memory per sample, on / off [95% CI]" + (" (≈ approximate: CPU)" if ts.memory_approximate else "")
    doc.table(["trick", "train time per sample, on / off [95% CI]", memory, "n"], rows)


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
    inter = inter[inter["n"] > 0] if len(inter) else inter
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
    """Every arm of one_at_a_time / leave_one_out; factorial designs: the single-trick arms (all if none)."""
    labels = [a for a, _ in ts.arms]
    if ts.design in ("one_at_a_time", "leave_one_out"):
        return labels
    singles = [a for a, on in ts.arms if len(on) <= 1]
    return singles if len(singles) > 1 else labels


def _outputs(doc: _Doc, ts: TaskStats, runs: pd.DataFrame, gdir: Path, figdir: Path) -> None:
    """The task's own pictures of its outputs (render_outputs) for every arm, one seed, paged by 8 arms."""
    arms = _output_arms(ts)
    done = runs[runs["status"] == store.RunStatus.COMPLETED]
    have = {
        (r.arm, int(r.seed)): gdir / "runs" / r.run_id
        for r in done.itertuples()
        if (gdir / "runs" / r.run_id / store.FINAL_MODEL).exists()
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
        try:
            picture = cached_outputs(rdir)
        except Exception as exc:  # a broken run must not stop the report
            problems.append(f"`{arm}`: {exc!r} ({traceback.format_exc(limit=1).splitlines()[-1]})")
            continue
        if picture is None:
            doc.para(f"(task `{ts.task}` draws no outputs: its `render_outputs` is not implemented)")
            return
        out = figdir / f"{ts.label}_outputs_{re.sub(r'[^A-Za-z0-9_.+-]', '_', arm)}.png"
        shutil.copyfile(picture, out)
        row = done[(done["arm"] == arm) & (done["seed"] == seed)]
        value = row[f"metric.{ts.metric}"].iloc[0] if f"metric.{ts.metric}" in row else float("nan")
        panels.append((f"{arm} — seed {seed} — {ts.metric} = {_g(value, 4)}", out))
    if panels:
        pages = plots.outputs_figures(panels, figdir / f"{ts.label}_outputs.png", f"{ts.label}: outputs, seed {seed}")
        for n, path in enumerate(pages, start=1):
            more = f", page {n} of {len(pages)}" if len(pages) > 1 else ""
            doc.figure(f"{ts.label}: outputs of every arm (seed {seed}{more})", path)
    for p in problems:
        doc.para(f"outputs not drawn for {p}")


def cached_outputs(rdir: Path) -> Path | None:
    """The picture of a finished run's outputs, ``<run>/outputs.png``; None when its task draws none.

    Drawn once by :func:`_render_run` (which imports torch and the task, and rebuilds the model) and kept
    in the run folder with ``outputs.json`` naming the SHA-256 of the final model it shows; later reports
    reuse it while that digest is the one result.json records. A run folder that cannot be written to
    gets its picture drawn again each time (into a temporary file beside the figures).
    """
    rdir = Path(rdir)
    res = store.read_json(rdir / store.RESULT)
    record = (res.get("artefacts") or {}).get(store.FINAL_MODEL) or {}
    digest = record.get("sha256") if isinstance(record, dict) else None
    png, meta_path = rdir / OUTPUTS_PNG, rdir / OUTPUTS_META
    try:
        meta = store.read_json(meta_path)
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and digest and meta.get("final_model_sha256") == digest:
        if not meta.get("drawn"):
            return None
        if png.is_file():
            return png
    tmp = rdir / f".{OUTPUTS_PNG}.{secrets.token_hex(8)}.tmp.png"  # the task writes a file: renamed when complete
    try:
        drawn = _render_run(rdir, tmp)
        if drawn:
            os.replace(tmp, png)
        store.atomic_write_json(meta_path, {"final_model_sha256": digest, "drawn": bool(drawn)})
    except OSError:
        if not os.access(rdir, os.W_OK):  # a read-only results folder: draw into a temporary file elsewhere
            return _render_elsewhere(rdir)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return png if drawn else None


def _render_elsewhere(rdir: Path) -> Path | None:
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="trickbench-outputs-")) / OUTPUTS_PNG
    return out if _render_run(rdir, out) else None


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
    model.load_state_dict(torch.load(rdir / store.FINAL_MODEL, map_location="cpu", weights_only=True))
    model.eval()
    return bool(task.render_outputs(model, out))


def terminal_summary(gdir: Path, stats: GridStats | None = None) -> str:
    """A short text table (task, trick, verdict, effect ± CI, p, cost ratio) to print at the end of a run;
    per task the tricks sorted by effect, best first."""
    gs = stats if stats is not None else analyze_grid(Path(gdir))
    header = ["task", "trick", "verdict", "effect [95% CI]", "% of off", "p(Holm)", "improved", "time×", "mem×",
              "seeds"]  # fmt: skip
    rows = []
    for ts in gs.tasks:
        order = sorted(ts.verdicts.iterrows(), key=lambda kv: -effect_gain(kv[1], ts.higher_is_better))
        for _, v in order:
            rows.append(
                [
                    ts.label,
                    v["term"] + (f" (+{v['aliases']})" if v["aliases"] else "") + (" ⚠" * v["code_mixed"]),
                    v["verdict"],
                    _effect(v["mean"], v["ci_low"], v["ci_high"], v["n"]) + f" {ts.metric}" * _finite(v["mean"]),
                    _pct(v["effect_pct"], None, None),
                    _p(v["p_holm"]),
                    _frac(v["frac_improved"], v["n"]),
                    _ratio(v["time_ratio"]),
                    _ratio(v["memory_ratio"], approx=bool(v["memory_approximate"])),
                    _seeds_range(v),
                ]
            )
    notes = []
    adaptive = _adaptive_rows(Path(gdir))
    if adaptive is not None:
        notes.append(
            f"adaptive grid: the claims are the sequential decisions ({adaptive[1]}); the fixed-n columns above are "
            "descriptive after data-dependent stopping"
        )
    if gs.damaged:
        notes.append(f"{len(gs.damaged)} damaged run(s) left out (see `bench status`; `bench run` retrains them)")
    if gs.out_of_spec:
        notes.append(f"{gs.out_of_spec} run(s) of an earlier version of the spec left out (in_spec = False)")
    if gs.code_mixed:
        notes.append("⚠ some comparisons mix code versions (see the report; `bench run --rerun-stale`)")
    tail = "".join(f"\n{n}" for n in notes)
    if not rows:
        return f"grid {gs.grid}: no trick effects to summarise yet" + tail
    if not gs.usable_pairs:
        tail = "\nno usable pairs: no seed where both runs of a comparison completed; no verdicts" + tail
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"effect = on − off, paired by seed; {CONFIDENCE:.0%} t-interval († not calibrated); "
        f"seeds = range needed for a verdict ({POWER:.0%} power); ≈ approximate (CPU memory)"
    )
    return "\n".join(lines) + tail
