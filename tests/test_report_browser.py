"""The rendered report in a real headless browser (Debian's chromium): it loads offline, logs no console
error, nothing runs off the page, and its first screen shows the sorted, coloured summary.

Skipped at once where chromium is not installed (``.ci/run`` installs it). The screenshot of the first
screen is kept under the test's tmp folder (``first_screen.png``) as an artefact.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from bench.cli import main
from bench.plots import VERDICT_COLORS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
WINDOW = (1280, 900)
# after the page has loaded: where the summary is, what it says, and whether anything overflows the page
PROBE = """<script>
window.addEventListener('load', () => {
  const table = document.querySelector('table.summary');
  const box = table.getBoundingClientRect();
  const cells = [...table.querySelectorAll('tbody tr')].map(tr => [...tr.children].map(td => td.textContent));
  const verdicts = [...table.querySelectorAll('tbody tr td:nth-child(2)')].map(
    td => [td.className, getComputedStyle(td).backgroundColor, getComputedStyle(td).borderLeftColor]);
  const out = {top: box.top, bottom: box.bottom, width: innerWidth, height: innerHeight,
    scrollWidth: document.documentElement.scrollWidth, firstH2: document.querySelector('h2').textContent,
    rows: cells, verdicts: verdicts, images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
    headings: [...document.querySelectorAll('h2, h3')].map(h => h.textContent)};
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any network request would fail (and log)
        f"--window-size={WINDOW[0]},{WINDOW[1]}", "--enable-logging=stderr", "--v=0", *args, page.as_uri(),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_report_in_a_headless_browser(tmp_path: Path, synthetic_task: str) -> None:
    spec = {
        "grid": "browser",
        "seeds": 3,
        "tasks": {
            "synthetic": {
                "params": {"dim": 8},
                "train": {"budget_samples": 512, "batch_size": 32, "eval_every_samples": 256,
                          "checkpoint_every_samples": 512},
                "tricks": {"ema": {"half_life_samples": 64}, "accumulation": {"micro_batches": 2},
                           "no_weight_decay": None},
            }
        },
    }  # fmt: skip
    path = tmp_path / "browser.yaml"
    path.write_text(json.dumps(spec))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--no-progress", "--executor", "debug"]) == 0
    report = results / "browser" / "report.html"

    # the checker sees a console error when there is one (so its silence below means something)
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><p>x</p><script>throw new Error('boom')</script>")
    assert _console_errors(_chromium(broken, tmp_path / "profile0", "--dump-dom").stderr)

    # the page as written: loads offline, no console message at all (it has no script), the first screen drawn
    shot = tmp_path / "first_screen.png"
    run = _chromium(report, tmp_path / "profile1", f"--screenshot={shot}")
    assert shot.is_file(), run.stderr[-2000:]
    assert not _console_errors(run.stderr), _console_errors(run.stderr)
    pixels = (mpimg.imread(str(shot))[..., :3] * 255).round()
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    present = [
        cls
        for cls, color in VERDICT_COLORS.items()
        if np.any(np.all(np.abs(pixels - [int(color[i : i + 2], 16) for i in (1, 3, 5)]) <= 2, axis=-1))
    ]
    assert present, "no verdict colour on the first screen"

    # the same page with a probe script appended: layout and order as the browser laid them out
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    run = _chromium(probe_page, tmp_path / "profile2", "--dump-dom", "--virtual-time-budget=10000")
    assert not _console_errors(run.stderr), _console_errors(run.stderr)
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", run.stdout, re.S)
    assert found, run.stdout[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["firstH2"] == "Answer" and probe["headings"][1].startswith("synthetic: test_mse")
    assert 0 <= probe["top"] < probe["height"], probe  # the sorted summary is on the first screen
    assert probe["scrollWidth"] <= probe["width"], probe  # nothing runs off the page (wide tables scroll inside)
    assert probe["images"] and all(probe["images"])  # every embedded figure decodes
    pct = [float(re.match(r"([+-][\d.e+-]+)%", row[2]).group(1)) for row in probe["rows"]]
    assert pct == sorted(pct) and len(pct) == 3  # lower is better: best (most negative) first
    for cls, background, border in probe["verdicts"]:
        name = cls.removeprefix("v-").replace("-", " ")
        assert name in VERDICT_COLORS, cls
        hex_rgb = [int(VERDICT_COLORS[name][i : i + 2], 16) for i in (1, 3, 5)]
        assert border == f"rgb({hex_rgb[0]}, {hex_rgb[1]}, {hex_rgb[2]})", (cls, border)
        assert background.startswith("rgba("), (cls, background)  # the tint of its verdict
