"""Checks of a written report from the data it wrote (``report.json``, ``figures/*.json``), shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

from bench import plots

#: a table cell that says nothing: a row of only these (after its label) is an empty row
EMPTY_CELLS = {"", "—", "0", "0 / 0 / 0", "0 (0)"}


def empty_rows(report: dict) -> list[str]:
    """Rows of the report's tables whose every cell after the first says nothing."""
    return [
        f"{t['section']}: {row}"
        for t in report["tables"]
        for row in t["rows"]
        if all(str(c).strip() in EMPTY_CELLS for c in row[1:])
    ]


def check_no_empty_panel_or_row(gdir: Path) -> dict:
    """Assert that no table row and no figure panel of grid ``gdir``'s report is empty; return report.json."""
    report = json.loads((Path(gdir) / "report.json").read_text())
    assert not empty_rows(report), empty_rows(report)
    for fig in report["figures"]:
        assert fig["panels"], fig["file"]
        assert not plots.empty_panels(fig), (fig["file"], plots.empty_panels(fig))
    for sidecar in (Path(gdir) / "figures").glob("*.json"):  # also figures the report draws but does not list
        data = json.loads(sidecar.read_text())
        assert not plots.empty_panels(data), (sidecar.name, plots.empty_panels(data))
    return report
