"""`launcher report`: a PNG of the runs' curves, overlaid, and a self-contained HTML page that a
headless browser loads without console errors."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from tests.conftest import RECIPE, launcher_cli, tiny_args, why_failed


@pytest.fixture(scope="module")
def two_runs(ranks1, tiny_model, tiny_data, tmp_path_factory):
    """Two real tiny runs (4 steps, an eval every 2) that differ in their learning rate."""
    runs = []
    for lr in ("1e-3", "5e-4"):
        out = tmp_path_factory.mktemp(f"lr{lr}") / "run"
        settings = tiny_args(tiny_model, tiny_data, out, "train.max_steps=4", "train.eval_every=2", f"train.lr={lr}")
        proc = ranks1.run(RECIPE, settings, cwd=out.parent)
        assert proc.returncode == 0, why_failed(proc)
        runs.append(out)
    return runs


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _not_blank(path) -> float:
    """The share of the image's pixels that are not its most common colour (a blank image: 0)."""
    from matplotlib import image

    pixels = image.imread(str(path))[..., :3].reshape(-1, 3)
    colours, counts = __import__("numpy").unique((pixels * 255).astype("uint8"), axis=0, return_counts=True)
    return 1 - counts.max() / counts.sum()


def test_a_report_of_two_runs_draws_both_and_tells_their_settings_apart(two_runs, tmp_path):
    out = tmp_path / "report"
    proc = launcher_cli(["report", *map(str, two_runs), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, why_failed(proc)
    png, page = out / "report.png", out / "report.html"
    assert _png_size(png) == (1500, 900)
    assert _not_blank(png) > 0.05
    text = page.read_text()
    names = [f"{p.parent.name}/run" for p in two_runs]  # both folders are named run: told apart by their parent
    assert all(name in text for name in names), names
    assert re.search(r"<td>train\.lr</td><td>0\.001</td><td>0\.0005</td>", text), "the differing lr is tabled"
    assert not re.search(r"""(src|href)=['"]?https?:""", text)  # self-contained: nothing fetched
    assert "data:image/png;base64," in text


@pytest.mark.long
def test_the_report_loads_in_headless_chromium_without_console_errors(two_runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (scripts/system_packages.sh installs Debian's where it is root)")
    out = tmp_path / "report"
    assert launcher_cli(["report", *map(str, two_runs), "--out", str(out)], cwd=tmp_path).returncode == 0
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--window-size=1400,1600", f"--screenshot={shot}", f"file://{out / 'report.html'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    assert _png_size(shot) == (1400, 1600) and _not_blank(shot) > 0.05


def test_a_folder_that_is_not_a_run_is_a_usage_error(tmp_path):
    proc = launcher_cli(["report", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and f"{tmp_path}: no metrics.jsonl, so not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
