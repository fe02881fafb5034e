"""Every benchmark script's --smoke mode, run the way a user runs it, so the scripts never rot.

`benchmarks/run_all.py --smoke` runs each script in its own process on a tiny random Llama
and assembles RESULTS.md in a temporary directory; the committed results are never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("quality", "memory", "overhead", "speedup")
# The committed outputs of these scripts (other benchmarks write beside them; they are not checked here).
COMMITTED = [BENCHMARKS / "RESULTS.md", BENCHMARKS / "results" / "run_all.json"] + [
    BENCHMARKS / "results" / f"{name}.{ext}" for name in SCRIPTS for ext in ("md", "json")
]

pytestmark = pytest.mark.slow


def _snapshot() -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in COMMITTED if p.exists()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    before = _snapshot()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    return out, done, before


def _log_tail(out: Path, name: str) -> str:
    log = out / f"{name}.log"
    return log.read_text()[-3000:] if log.exists() else "(no log)"


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_mode_writes_a_report(smoke, name):
    out, done, _ = smoke
    timings = json.loads((out / "run_all.json").read_text())
    assert timings[name]["rc"] == 0, f"{name} --smoke failed:\n{_log_tail(out, name)}"
    assert "--smoke" in timings[name]["command"]
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith("# ") and "smoke test" in markdown
    assert "|---" in markdown and "Target" in markdown
    data = json.loads((out / f"{name}.json").read_text())
    assert data["machine"]["cores"] >= 1


def test_quality_smoke_covers_every_method_and_the_peer(smoke):
    out, _, _ = smoke
    runs = json.loads((out / "quality.json").read_text())["runs"]
    labels = {run["label"] for run in runs.values()}
    assert {"dense", "lora", "taylor", "taylor2", "magnitude", "random", "torch-pruning", "lora-channels"} <= labels
    for run in runs.values():
        assert run["after_recovery"]["wiki"] > 0 and run["after_recovery"]["c4"] > 0
        if run["label"] != "dense":
            assert run["after_pruning"], f"{run['label']}: no perplexity right after pruning"
            assert abs(run["reached"] - run["sparsity"]) < 0.05, run
    lora = next(run for run in runs.values() if run["label"] == "lora")
    assert lora["base"].startswith("8-bit") and lora["evaluated"].startswith("exported")


def test_run_all_assembles_results_and_never_touches_committed_ones(smoke):
    out, done, before = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    results = (out / "RESULTS.md").read_text()
    assert "CPU cores" in results and "## Targets" in results
    for name in SCRIPTS:
        assert f"benchmarks/{name}.py" in results and "--smoke" in results
    assert _snapshot() == before, "a smoke run modified benchmarks/RESULTS.md or benchmarks/results/"
