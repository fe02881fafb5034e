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
SCRIPTS = ("quality", "recipes", "memory", "overhead", "speedup")
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


def test_quality_smoke_covers_every_budget_method_and_the_peer(smoke):
    out, _, _ = smoke
    data = json.loads((out / "quality.json").read_text())
    runs = data["runs"].values()
    assert {run["budget"] for run in runs} == {"dense", "oneshot", "budget16", "budget200"}
    for budget, methods in (("oneshot", {"default", "act-taylor", "torch-pruning"}),
                            ("budget16", {"default", "act-taylor", "default-global"}),
                            ("budget200", {"default", "torch-pruning"})):
        assert methods <= {run["method"] for run in runs if run["budget"] == budget}, budget
    one_shot = [run for run in runs if run["budget"] == "oneshot"]
    assert {run["structures"] for run in one_shot} == {"channels", "heads+channels"}
    assert all(run["structures"] == "channels" for run in runs if run["method"] == "torch-pruning")
    for run in runs:
        assert run["after_recovery"]["wiki"] > 0 and run["after_recovery"]["c4"] > 0
        if run["method"] != "dense":
            assert run["after_pruning"], f"{run['key']}: no perplexity right after pruning"
            assert abs(run["reached"] - run["sparsity"]) < 0.05, run
            assert run["pruning_seconds"] > 0
    # The default follows the package: its resolved config is PruningConfig() at the run's point.
    from hfprune import PruningConfig

    default = next(run for run in runs if run["budget"] == "budget16" and run["method"] == "default")
    assert default["config"]["importance"] == PruningConfig().importance
    assert default["base"] == "8bit" and default["evaluated"].startswith("exported")
    # budget200 evaluates in the loop: a curve from the pruning stage to the last step, and the PNG.
    curve = next(run for run in runs if run["budget"] == "budget200" and run["method"] == "default")["curve"]
    assert [p["step"] for p in curve] == [2, 4] and curve[-1]["wiki"] == pytest.approx(
        next(run for run in runs if run["budget"] == "budget200" and run["method"] == "default")["after_recovery"]["wiki"])
    assert (out / "quality_curves.png").stat().st_size > 10_000
    targets = {row[0]: row[2] for row in data["targets"]}
    assert len(targets) == 7 and all(result in ("met", "**missed**", "n/a") for result in targets.values())
    assert targets["default-global beats default by >= 5% at 50%"] != "n/a"
    assert "budget200: default beats Torch-Pruning by >= 10% at every sparsity" in targets
    readme = (out / "quality_readme.md").read_text()
    assert "`budget200`" in readme and "quality_curves.png" in readme


def test_recipes_smoke_runs_a_recipe_through_the_cli(smoke):
    out, _, _ = smoke
    data = json.loads((out / "recipes.json").read_text())
    (row,) = data["rows"]
    assert row["rc"] == 0 and row["steps"] == 4 and row["wall_seconds"] > 0
    assert row["wiki"] > 0 and row["c4"] > 0 and data["dense"]["wiki"] > 0
    assert row["params"] < data["dense"]["params"] and abs(row["reached"] - 0.5) < 0.05
    assert [t[0] for t in data["targets"]][:1] == ["tiny-quality: <= 1.3x dense perplexity"]


def test_run_all_assembles_results_and_never_touches_committed_ones(smoke):
    out, done, before = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    results = (out / "RESULTS.md").read_text()
    assert "CPU cores" in results and "## Targets" in results
    for name in SCRIPTS:
        assert f"benchmarks/{name}.py" in results and "--smoke" in results
    assert _snapshot() == before, "a smoke run modified benchmarks/RESULTS.md or benchmarks/results/"


def test_estimator_validation_smoke_covers_the_quantized_bases():
    """`validate_estimator.py --smoke`: the 8-bit and 4-bit setups measured against the estimator, within 5%."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    before = _snapshot()
    done = subprocess.run([sys.executable, str(BENCHMARKS / "validate_estimator.py"), "--smoke"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| smoke |") and "bit" in line]
    setups = {row[4].strip(): float(row[7]) for row in rows if len(row) > 12}
    assert {"lora-8bit", "lora-4bit", "lora-4bit-ckpt", "activation_taylor-4bit-ckpt"} <= set(setups)
    assert all(abs(ratio - 1) <= 0.05 for ratio in setups.values()), setups
    assert _snapshot() == before


def test_criteria_oneshot_smoke(tmp_path):
    """benchmarks/criteria_oneshot.py (not part of run_all): every criterion's row, and the table rebuilt from the JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    script = str(BENCHMARKS / "criteria_oneshot.py")
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["criterion"]: row for row in json.loads((tmp_path / "criteria_oneshot.json").read_text())["rows"]}
    assert set(rows) == {"dense", "taylor", "taylor2", "param_second", "bonsai"}
    assert rows["taylor"]["differs_from_taylor"] == {"0.2": 0.0, "0.5": 0.0}
    assert rows["taylor2"]["second_order_ratio"]["median"] > 0
    assert rows["bonsai"]["rounds"][0]["mean_sampled_loss"] > 0
    done = subprocess.run([sys.executable, script, "--smoke", "--out", str(tmp_path), "--table-only"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| param_second |" in (tmp_path / "criteria_oneshot.md").read_text()


def test_reports_name_the_other_torch_processes_running_beside_them():
    """A torch job started beside a benchmark (here a grandchild, as any unrelated job would be) is named in the
    report's machine line; the benchmark's own process and ancestors are not."""
    import time

    sys.path.insert(0, str(BENCHMARKS))
    import common

    before = set(common.other_torch_processes())
    assert not any(entry.startswith(f"{os.getpid()} ") for entry in before)  # pytest has torch: never counted
    other = subprocess.Popen(["sh", "-c", f"{sys.executable} -c 'import torch, time; time.sleep(60)' & wait"])
    try:
        deadline = time.monotonic() + 60
        while not (found := set(common.other_torch_processes()) - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(found) == 1 and "import torch" in next(iter(found)), found
        assert f"other torch processes at start: {len(before) + 1}" in common.machine_line(common.machine())
    finally:
        subprocess.run(["pkill", "-P", str(other.pid)])
        other.wait(timeout=30)
