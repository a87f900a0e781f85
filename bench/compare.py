"""``bench compare GRID_A GRID_B``: two versions of one grid (e.g. before and after a code change), compared.

Runs are paired by task label, arm and seed — seed *s* of an arm in A and in B share their seed
bundle, so B − A per seed is a paired difference, as a trick's effect is. For every arm the
effect of going from A to B on each metric is :func:`bench.stats.paired_effect` (the calibrated
t-interval and test), Holm-adjusted across the arms of a task per metric; the verdict uses the
same rule as a trick's (:func:`bench.stats.verdict`), worded for a comparison: B better / B worse
/ same (the interval of d_z within ±0.5) / unclear / too few seeds, and *identical* when every
seed gave exactly the same value. Train time per sample, B / A, uses the cost ratio of every
report (:func:`bench.stats.paired_ratio`). Which code parts differ between the grids' runs is
read from their fingerprints.

Only completed runs of each grid's current spec count. Reads the two grid folders and writes
``compare.md`` and ``compare.csv`` into ``out`` (default: GRID_B's folder); imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import store
from bench.stats import (
    CONFIDENCE,
    MIN_TEST_SEEDS,
    N_RESAMPLES,
    Term,
    code_parts,
    holm,
    metric_direction,
    paired_effect,
    paired_ratio,
    verdict,
)

__all__ = ["Comparison", "compare_grids", "write_comparison"]

#: how the verdict rule's labels read when B is compared with A
LABELS = {
    "helps": "B better",
    "hurts": "B worse",
    "no detectable effect": "same",
    "needs more seeds": "unclear",
}


@dataclass
class Comparison:
    """B − A of two versions of a grid: one row per task × arm × metric (``rows``), and what differs."""

    grid_a: Path
    grid_b: Path
    rows: pd.DataFrame
    code_changes: list[str]  # code parts whose digests differ between the runs of A and of B
    notes: list[str]

    def primary(self) -> pd.DataFrame:
        """The rows of each task's primary metric."""
        return self.rows[self.rows["primary"]] if len(self.rows) else self.rows


def _grid(gdir: Path) -> tuple[pd.DataFrame, dict[str, tuple[str, bool, dict[str, bool]]]]:
    """Completed runs of the grid's current spec, and per task label (primary metric, direction, directions)."""
    from bench.runner import grid_cells

    spec, cells = grid_cells(gdir)  # FileNotFoundError naming the folder when it is not a launched grid
    ids = {c.run_id for c in cells}
    runs = store.load_grid(gdir)
    if len(runs):
        runs = runs[runs["run_id"].isin(ids) & (runs["status"] == store.RunStatus.COMPLETED)]
    directions = {}
    for t in spec.tasks:
        for c in cells:
            if c.task != t.label or store.run_status(gdir / "runs" / c.run_id) != store.RunStatus.COMPLETED:
                continue
            res = store.read_json(gdir / "runs" / c.run_id / store.RESULT)
            dirs = res.get("metric_directions") if isinstance(res.get("metric_directions"), dict) else {}
            directions[t.label] = (str(res["primary_metric"]), bool(res["higher_is_better"]), dirs)
            break
    if len(runs):
        order = {key: i for i, key in enumerate(dict.fromkeys((c.task, c.arm) for c in cells))}  # the design's
        runs = runs.assign(code_parts=[_parts(gdir, rid) for rid in runs["run_id"]])
        runs = runs.assign(_order=[order[(t, a)] for t, a in zip(runs["task"], runs["arm"])]).sort_values("_order")
    return runs, directions


def _parts(gdir: Path, run_id: str) -> dict[str, str]:
    try:
        return code_parts(store.read_json(gdir / "runs" / run_id / store.CONFIG).get("fingerprint"))
    except (OSError, ValueError, AttributeError):
        return {}


def _label(v_label: str, code: str, diffs: np.ndarray) -> str:
    if len(diffs) and np.all(diffs == 0):
        return "identical"
    if code == "too_few_seeds":
        return "too few seeds"
    return LABELS.get(v_label, v_label)


def compare_grids(grid_a: Path, grid_b: Path, *, n_resamples: int = N_RESAMPLES) -> Comparison:
    """Pair the completed runs of ``grid_a`` and ``grid_b`` by task, arm and seed and compare every metric.

    ValueError when the grids share no (task, arm, seed) with completed runs in both (not two versions
    of one grid, or nothing finished); FileNotFoundError when a folder is not a launched grid.
    """
    grid_a, grid_b = Path(grid_a), Path(grid_b)
    runs_a, dirs_a = _grid(grid_a)
    runs_b, dirs_b = _grid(grid_b)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for task in [t for t in dirs_a if t in dirs_b]:
        (metric, hib, declared), (metric_b, _, declared_b) = dirs_a[task], dirs_b[task]
        if metric != metric_b:
            notes.append(f"task {task}: primary metric {metric} in A but {metric_b} in B; not compared")
            continue
        declared = {**declared_b, **declared}
        a, b = runs_a[runs_a["task"] == task], runs_b[runs_b["task"] == task]
        metrics = [c for c in a.columns if c.startswith("metric.") and c in b.columns]
        metrics = [f"metric.{metric}", *sorted(m for m in metrics if m != f"metric.{metric}")]
        for arm in [x for x in dict.fromkeys(a["arm"]) if x in set(b["arm"])]:
            pa = a[a["arm"] == arm].set_index("seed")
            pb = b[b["arm"] == arm].set_index("seed")
            seeds = sorted(set(pa.index) & set(pb.index))
            if not seeds:
                continue
            cost = pd.DataFrame(
                {"A": pd.to_numeric(pa.loc[seeds, "cost.train_s_per_sample"], errors="coerce"),
                 "B": pd.to_numeric(pb.loc[seeds, "cost.train_s_per_sample"], errors="coerce")}
            )  # fmt: skip
            time = paired_ratio(cost, Term("B/A", ("B",), {"B": 1.0, "A": -1.0}), n_resamples=n_resamples)
            changed = sorted(
                {
                    part
                    for s in seeds
                    for part, digest in pa.at[s, "code_parts"].items()
                    if pb.at[s, "code_parts"].get(part, digest) != digest
                }
            )
            for col in metrics:
                if col not in pa or col not in pb:
                    continue
                name = col.removeprefix("metric.")
                va = pd.to_numeric(pa.loc[seeds, col], errors="coerce")
                vb = pd.to_numeric(pb.loc[seeds, col], errors="coerce")
                ok = np.isfinite(va.to_numpy(float)) & np.isfinite(vb.to_numpy(float))
                if not ok.any():
                    continue
                diffs = vb.to_numpy(float)[ok] - va.to_numpy(float)[ok]
                direction = hib if name == metric else declared.get(name, metric_direction(None, name))
                eff = paired_effect(diffs, direction, n_resamples=n_resamples)
                rows.append(
                    {
                        "task": task,
                        "arm": arm,
                        "metric": name,
                        "primary": name == metric,
                        "higher_is_better": direction,
                        "n": eff.n,
                        "mean_a": float(va[ok].mean()),
                        "mean_b": float(vb[ok].mean()),
                        "diff": eff.mean,
                        "ci_low": eff.ci_low,
                        "ci_high": eff.ci_high,
                        "p": eff.p,
                        "dz": eff.dz,
                        "diffs": diffs,
                        "effect": eff,
                        "time_ratio": time["ratio"],
                        "time_low": time["low"],
                        "time_high": time["high"],
                        "code_changed": "; ".join(changed),
                    }
                )
    if not rows:
        raise ValueError(
            f"GRID_A {grid_a} and GRID_B {grid_b}: no task, arm and seed with a completed run in both; allowed: "
            "two versions of one grid (the same task labels and arms) with finished runs"
        )
    frame = pd.DataFrame(rows)
    frame["p_holm"] = np.nan
    for _, idx in frame.groupby(["task", "metric"]).groups.items():
        frame.loc[idx, "p_holm"] = holm(frame.loc[idx, "p"].to_numpy(dtype=float))
    labels = []
    for _, r in frame.iterrows():
        hib = r["higher_is_better"]
        if hib is None or (isinstance(hib, float) and math.isnan(hib)):
            labels.append("identical" if len(r["diffs"]) and np.all(r["diffs"] == 0) else "(no direction)")
            continue
        m = int(((frame["task"] == r["task"]) & (frame["metric"] == r["metric"])).sum())  # Holm's family
        v = verdict(r["effect"], float(r["p_holm"]), m=m)
        labels.append(_label(v.label, v.code, r["diffs"]))
    frame["verdict"] = labels
    changes = sorted({p for text in frame["code_changed"] for p in text.split("; ") if p})
    return Comparison(grid_a, grid_b, frame.drop(columns=["diffs", "effect"]), changes, notes)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return format(float(x), spec) if x is not None and math.isfinite(float(x)) else "—"


def _table(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["task", "arm", "metric", "n", "A", "B", f"B − A [{CONFIDENCE:.0%} CI]", "p (Holm)", "verdict",
              "time B / A", "code changed"]  # fmt: skip
    rows = []
    for _, r in cmp.primary().iterrows():
        ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else ""
        rows.append(
            [
                r["task"],
                r["arm"],
                r["metric"],
                str(int(r["n"])),
                _fmt(r["mean_a"], ".4g"),
                _fmt(r["mean_b"], ".4g"),
                f"{float(r['diff']):+.3g}{ci}",
                _fmt(r["p_holm"]),
                r["verdict"],
                (_fmt(r["time_ratio"]) + "×") if math.isfinite(r["time_ratio"]) else "—",
                r["code_changed"] or "—",
            ]
        )
    return header, rows


def terminal_table(cmp: Comparison) -> str:
    """The primary metric's rows as an aligned text table, with the code that changed."""
    header, rows = _table(cmp)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"A = {cmp.grid_a}, B = {cmp.grid_b}; paired by task, arm and seed (completed runs of both)")
    lines.append("code parts that differ: " + (", ".join(cmp.code_changes) or "none (same code in both)"))
    lines += cmp.notes
    return "\n".join(lines)


def write_comparison(cmp: Comparison, out: Path) -> tuple[Path, Path]:
    """Write ``compare.md`` (primary metrics, method) and ``compare.csv`` (every metric) into folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _table(cmp)
    lines = [
        "# trickbench comparison",
        "",
        f"A = `{cmp.grid_a}`, B = `{cmp.grid_b}`: every arm's runs paired by task, arm and seed (seed *s* of an "
        "arm shares its seed bundle in both grids), completed runs of both grids' current specs only.",
        "",
        f"B − A per seed, mean with the {CONFIDENCE:.0%} paired t-interval (calibrated: see the report's method); "
        "p (Holm) across the arms of a task; verdict by the rule of the trick verdicts: **B better** / **B worse** "
        "(p (Holm) < 0.05), **same** (not significant and the interval of d_z within ±0.5), **unclear**, "
        f"**too few seeds** (fewer than {MIN_TEST_SEEDS}), **identical** (every seed gave exactly the same value). "
        "Time: train time per sample, per-seed ratio B / A, geometric mean.",
        "",
        "Code parts that differ between the runs of A and B: "
        + (", ".join(f"`{c}`" for c in cmp.code_changes) or "none (the same code in both)")
        + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows],
        "",
        *[f"- {n}" for n in cmp.notes],
        "Every metric (secondary ones too): `compare.csv`.",
        "",
    ]
    md, csv = out / "compare.md", out / "compare.csv"
    store.atomic_write_text(md, "\n".join(lines))
    store.atomic_write_text(csv, cmp.rows.to_csv(index=False))
    return md, csv


def cmd_compare(grid_a: Path, grid_b: Path, out: Path | None = None) -> int:
    """``bench compare``: print the table, write compare.md / compare.csv (into GRID_B unless ``out``)."""
    cmp = compare_grids(grid_a, grid_b)
    md, _ = write_comparison(cmp, out if out is not None else Path(grid_b))
    print(terminal_table(cmp))
    print(f"comparison: {md}")
    return 0
