"""Faults a run must survive (issue #12): kill -9 inside a checkpoint write and inside `save_pruned`, two
writers of one directory, interrupted swaps, a failing Hub upload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfprune import atomic
from hfprune.atomic import DirectoryBusyError, atomic_directory, directory_lock, recover_directory
from hfprune.checkpoints import STATE_FILE, checkpoint_problem, checkpoint_to_resume, last_complete_checkpoint
from hfprune.export import save_pruned

from .run_tiny_save import pruned_model
from .tiny_models import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def _hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---- kill -9 inside a Trainer checkpoint write ------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _run("tests.run_tiny_training", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "final.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    "step, where, resumed_from",
    [
        (8, "trainer_state", 4),   # trainer_state.json half written; before the physical removal (step 6)
        (12, "pruning_state", 8),  # pruning_state.safetensors half written; after it: sliced weights
    ],
)
def test_kill_inside_a_checkpoint_write_resumes_from_the_newest_complete_one(tmp_path, uninterrupted, step, where,
                                                                              resumed_from):
    killed = _run("tests.run_tiny_training", str(tmp_path), "--kill-at", str(step), "--kill-in", where)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = tmp_path / "run"
    assert checkpoint_problem(run / f"checkpoint-{step}") is not None  # the kill left half a checkpoint
    assert last_complete_checkpoint(run) == run / f"checkpoint-{resumed_from}"

    resumed = _run("tests.run_tiny_training", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{step} is incomplete" in resumed.stderr and f"resuming from checkpoint-{resumed_from}" in resumed.stderr
    final = load_file(tmp_path / "final.safetensors")
    assert final.keys() == uninterrupted.keys() and any(k.startswith("removal.") for k in final)
    for key in final:
        assert torch.equal(final[key], uninterrupted[key]), key
    # every checkpoint left is complete, and none holds a temporary file
    assert all(checkpoint_problem(path) is None for path in run.iterdir())
    assert not [p for path in run.iterdir() for p in path.iterdir() if p.name.startswith(".")]


def test_resume_takes_only_complete_checkpoints(tmp_path):
    from safetensors.torch import save_file

    def checkpoint(step: int, trainer_state: str = '{"global_step": 1}', pruning_state: bool = True) -> Path:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if trainer_state is not None:
            (path / "trainer_state.json").write_text(trainer_state)
        if pruning_state:
            save_file({"x": torch.zeros(1)}, str(path / STATE_FILE))
        return path

    checkpoint(2)
    complete = checkpoint(4)
    checkpoint(6, pruning_state=False)
    checkpoint(8, trainer_state='{"global_st')
    (checkpoint(10) / STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a cut-short header
    assert last_complete_checkpoint(tmp_path) == complete
    assert "no pruning_state.safetensors" in checkpoint_problem(tmp_path / "checkpoint-6")
    assert "trainer_state.json does not read back" in checkpoint_problem(tmp_path / "checkpoint-8")
    assert "pruning_state.safetensors does not read back" in checkpoint_problem(tmp_path / "checkpoint-10")
    with pytest.raises(ValueError, match=r"checkpoint-8' is not a complete checkpoint.*resume from .*checkpoint-4"):
        checkpoint_to_resume(tmp_path, str(tmp_path / "checkpoint-8"), discard=False)
    assert checkpoint_to_resume(tmp_path, True, discard=True) == str(complete)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # the incomplete ones went


def test_no_complete_checkpoint_to_resume_from_is_named(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match=r"holds no complete checkpoint \(checkpoint-3: it has no trainer_state"):
        checkpoint_to_resume(tmp_path, True, discard=False)


def test_callback_resuming_from_a_checkpoint_without_its_state_refuses(tmp_path):
    """A plain Trainer picks the newest checkpoint itself: PruningCallback refuses one without its half
    instead of silently starting afresh."""
    from safetensors.torch import save_file

    from hfprune import PruningCallback, PruningConfig

    good, bad = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for path in (good, bad):
        path.mkdir()
        (path / "trainer_state.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(good / STATE_FILE))
    callback = PruningCallback(PruningConfig())
    with pytest.raises(ValueError, match=r"checkpoint-8', which has no pruning_state.safetensors.*resume from "
                                         r".*checkpoint-4', the newest complete one"):
        callback._restore(str(bad))


# ---- kill -9 during save_pruned ---------------------------------------------------------------------------


def _checkpoint_contents(directory: Path) -> dict:
    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    report = json.loads((directory / "pruning_report.json").read_text())
    return {"tensors": tensors, "config": config, "seed": report.get("seed"), "files": sorted(os.listdir(directory))}


def _same(a: dict, b: dict) -> bool:
    return (a["config"] == b["config"] and a["seed"] == b["seed"] and a["files"] == b["files"]
            and a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Reference checkpoints of the two models the kill tests write (seed 1: the old one, seed 2: the new)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for seed in (1, 2):
        path = save_pruned(pruned_model(seed), root / f"seed{seed}", tokenizer=tiny_tokenizer(),
                           report={"criterion": "magnitude", "seed": seed})
        out[seed] = _checkpoint_contents(path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_in, exchange, right_after",
    [
        ("writing", True, 1),  # killed with the new checkpoint half written: the old one is in place
        ("swap", True, 2),     # killed right after the atomic exchange: the new one is in place
        ("swap", False, None),  # killed between the two renames: no directory until the next load or save
    ],
)
def test_kill_during_save_pruned_then_save_again(tmp_path, saved, kill_in, exchange, right_after):
    target = tmp_path / "model"
    save_pruned(pruned_model(1), target, tokenizer=tiny_tokenizer(), report={"criterion": "magnitude", "seed": 1})
    args = [str(target), "--seed", "2", "--kill-in", kill_in] + ([] if exchange else ["--no-exchange"])
    killed = _run("tests.run_tiny_save", *args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _hidden_leftovers(tmp_path)  # what the killed writer left: its temporary directory, its lock
    if right_after is None:
        assert not target.exists()
        recover_directory(target)  # what hfprune's loaders (CLI, push, PruningTrainer(model=...)) run first
        right_after = 2  # the new checkpoint was complete before the old one was moved aside
    assert _same(_checkpoint_contents(target), saved[right_after])

    save_pruned(pruned_model(2), target, tokenizer=tiny_tokenizer(), overwrite=True,
                report={"criterion": "magnitude", "seed": 2})
    assert _same(_checkpoint_contents(target), saved[2])
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary directory, no lock file


def test_an_interrupted_swap_is_finished_or_rolled_back_by_the_next_load(tmp_path):
    target = tmp_path / "model"
    # killed between the renames: .old aside, .tmp of the same writer complete -> the new one goes in
    (tmp_path / ".model.old-1-aa").mkdir()
    (tmp_path / ".model.old-1-aa" / "which").write_text("old")
    (tmp_path / ".model.tmp-1-aa").mkdir()
    (tmp_path / ".model.tmp-1-aa" / "which").write_text("new")
    (tmp_path / ".model.tmp-9-zz").mkdir()  # another killed writer's half-written directory
    recover_directory(target)
    assert (target / "which").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]
    # only the old one aside (its new one gone): it goes back
    os.rename(target, tmp_path / ".model.old-2-bb")
    recover_directory(target)
    assert (target / "which").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]


def test_a_live_writer_is_left_alone_and_its_rival_refused(tmp_path):
    """Two saves to one directory: the second gets DirectoryBusyError at once (never OSError: Directory not
    empty), and a load meanwhile touches nothing of the writer's."""
    target = tmp_path / "model"
    with atomic_directory(target, overwrite=False) as tmp:
        (tmp / "file").write_text("x")
        recover_directory(target)  # a loader while the writer works: leaves its temporary directory alone
        assert tmp.is_dir()
        with pytest.raises(DirectoryBusyError, match=rf"output_dir='{target}' is being written by another process "
                                                     rf"\(pid {os.getpid()}"):
            save_pruned(pruned_model(1), target, tokenizer=tiny_tokenizer())
    assert (target / "file").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.slow
def test_two_processes_saving_one_directory(tmp_path):
    target = tmp_path / "model"
    writer = subprocess.Popen([sys.executable, "-m", "tests.run_tiny_save", str(target), "--seed", "2",
                               "--hold-lock", "60"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert writer.stdout.readline().strip() == "writing"  # it holds the lock, half-way through
        with pytest.raises(DirectoryBusyError, match=rf"is being written by another process \(pid {writer.pid}"):
            save_pruned(pruned_model(1), target, tokenizer=tiny_tokenizer(), overwrite=True)
    finally:
        writer.kill()
        writer.wait(timeout=60)
    save_pruned(pruned_model(1), target, tokenizer=tiny_tokenizer(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_the_swap_without_rename_exchange_replaces_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    for text in ("old", "new"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "which").write_text(text)
    assert (target / "which").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]


def test_the_lock_is_free_again_after_an_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=False):
            raise RuntimeError("boom")
    with directory_lock(target):
        pass
    assert os.listdir(tmp_path) == []


# ---- the Hub ----------------------------------------------------------------------------------------------


def test_a_persistent_lfs_failure_is_a_hub_push_error_and_leaves_the_directory_alone(tmp_path, local_hub, monkeypatch):
    import huggingface_hub._commit_api as commit_api
    import httpx2 as httpx
    from huggingface_hub.errors import HfHubHTTPError

    from hfprune.hub import HubPushError, push_pruned

    directory = save_pruned(pruned_model(1), tmp_path / "model", tokenizer=tiny_tokenizer(), model_card=False,
                            report={"criterion": "magnitude"})
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def failing_upload(*args, **kwargs):  # what huggingface_hub raises once its retries are spent
        url = f"{local_hub.url}/_lfs/upload/0"
        response = httpx.Response(500, request=httpx.Request("PUT", url), text="storage unavailable")
        raise HfHubHTTPError(f"500 Server Error for url: {url} (storage unavailable)", response=response)

    local_hub.lfs_threshold = 1  # every file through Git LFS
    real_upload = commit_api.lfs_upload
    monkeypatch.setattr(commit_api, "lfs_upload", failing_upload)
    with pytest.raises(HubPushError) as caught:
        push_pruned(directory, "test-user/tiny")
    message = str(caught.value)
    assert "test-user/tiny" in message and "Git LFS" in message and "Nothing was committed" in message
    assert "storage unavailable" in message and isinstance(caught.value.__cause__, RuntimeError)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no README.md written into it
    assert local_hub.list_files("test-user/tiny") == [".gitattributes"]

    monkeypatch.setattr(commit_api, "lfs_upload", real_upload)
    push_pruned(directory, "test-user/tiny")  # now it goes up, and the directory gets the card it pushed
    remote = local_hub.files("test-user/tiny")
    assert remote["README.md"] == (directory / "README.md").read_bytes()
    assert 'from_pretrained("test-user/tiny")' in remote["README.md"].decode()



def test_a_recipe_resumes_only_from_a_complete_checkpoint(capsys, tmp_path, monkeypatch):
    import yaml

    import hfprune.trainer
    from hfprune.cli import main

    from .tiny_models import alpaca_records, save_tiny

    monkeypatch.setattr(hfprune.trainer.PruningTrainer, "__init__",
                        lambda *a, **k: pytest.fail("the model was loaded before the error was found"))
    save_tiny("llama", tmp_path / "base")
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(8)))
    (tmp_path / "trainer" / "checkpoint-4").mkdir(parents=True)  # killed before it was complete
    recipe = {"model": {"name_or_path": str(tmp_path / "base"), "load_in_8bit": False},
              "data": {"train": "data.json"},
              "training": {"output_dir": str(tmp_path / "trainer"), "max_steps": 4, "use_cpu": True}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for override, message in (
        ("training.resume_from_checkpoint=last",
         "training.output_dir=... holds no complete checkpoint (checkpoint-4: it has no trainer_state.json)"),
        (f"training.resume_from_checkpoint={tmp_path / 'trainer' / 'checkpoint-4'}",
         "checkpoint-4' is not a complete checkpoint: it has no trainer_state.json"),
    ):
        code = main(["prune", str(tmp_path / "recipe.yaml"), override])
        err = capsys.readouterr().err
        head, tail = message.split("...") if "..." in message else (message, "")
        assert code == 2 and head in err and tail in err, err
