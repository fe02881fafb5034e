"""Round-trips through huggingface_hub / transformers over real HTTP against the LocalHub test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import LocalHub


TOKEN = "hf_test_token"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _logits(model) -> torch.Tensor:
    input_ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# (1) create_repo + upload_folder of a tiny Llama in one commit, then from_pretrained in a fresh cache
# ---------------------------------------------------------------------------------------------------------------


def test_upload_folder_then_from_pretrained_reproduces_logits(local_hub: LocalHub, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    assert constants.ENDPOINT == local_hub.url
    api = HfApi()
    assert api.whoami()["name"] == "test-user"

    repo_url = api.create_repo("tiny-llama")  # no namespace -> the token's user
    repo_id = repo_url.repo_id
    assert repo_id == "test-user/tiny-llama"
    assert local_hub.repo_exists(repo_id)

    model = _tiny_llama()
    expected = _logits(model)
    save_dir = tmp_path / "saved"
    model.save_pretrained(save_dir)
    saved_files = sorted(p.name for p in save_dir.iterdir())
    assert "model.safetensors" in saved_files and "config.json" in saved_files

    info = api.upload_folder(repo_id=repo_id, folder_path=save_dir, commit_message="Add tiny llama")
    assert len(local_hub.requests_to("/commit/", method="POST")) == 1  # a single commit
    assert info.oid == local_hub.head(repo_id)
    assert [c["title"] for c in local_hub.commits(repo_id)] == ["Add tiny llama", "initial commit"]

    files = api.list_repo_files(repo_id)
    assert sorted(files) == sorted([".gitattributes", *saved_files])
    assert local_hub.files(repo_id)["model.safetensors"] == (save_dir / "model.safetensors").read_bytes()

    fresh_cache = tmp_path / "fresh-cache"
    loaded = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=fresh_cache).eval()
    assert torch.equal(_logits(loaded), expected)
    # downloaded over HTTP into the fresh cache, pinned to the commit that was just made
    snapshot = fresh_cache / "models--test-user--tiny-llama" / "snapshots" / info.oid
    assert (snapshot / "model.safetensors").is_file()
    assert local_hub.requests_to("/resolve/", method="GET")
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []


def test_push_to_hub_through_lfs_and_reload(local_hub: LocalHub, tmp_path: Path):
    """transformers' own push_to_hub; files >= 1 KiB go through the Git LFS batch + PUT path."""
    from transformers import AutoModelForCausalLM

    local_hub.lfs_threshold = 1024
    model = _tiny_llama()
    commit = model.push_to_hub("test-org/pushed-llama", commit_message="push")
    assert commit.oid == local_hub.head("test-org/pushed-llama")
    assert local_hub.requests_to(".git/info/lfs/objects/batch", method="POST")
    tree = {f.path: f for f in HfApi().list_repo_tree("test-org/pushed-llama")}
    assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None

    loaded = AutoModelForCausalLM.from_pretrained("test-org/pushed-llama", cache_dir=tmp_path / "c").eval()
    assert torch.equal(_logits(loaded), _logits(model))
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []


# ---------------------------------------------------------------------------------------------------------------
# (2) authentication
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_401(local_hub: LocalHub, tmp_path: Path):
    bad = HfApi(token="hf_wrong_token")
    with pytest.raises(HfHubHTTPError) as err:
        bad.create_repo("nope")
    assert err.value.response.status_code == 401
    assert "401" in str(err.value)
    assert err.value.response.json() == {"error": "Invalid credentials in Authorization header"}
    assert not local_hub.repo_exists("test-user/nope")

    local_hub.create_repo("test-user/existing")
    before = local_hub.head("test-user/existing")
    with pytest.raises(HfHubHTTPError) as err:
        bad.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="test-user/existing")
    assert err.value.response.status_code == 401 and "401" in str(err.value)

    # no token at all on a write endpoint
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=False).create_commit(
            repo_id="test-user/existing",
            operations=[CommitOperationAdd(path_in_repo="x.txt", path_or_fileobj=b"x")],
            commit_message="anonymous",
        )
    assert err.value.response.status_code == 401 and "401" in str(err.value)
    assert "error" in err.value.response.json()
    assert local_hub.head("test-user/existing") == before

    # quirk: HfApi.whoami re-raises a 401 as HfHubHTTPError("Invalid user token. ...") without the status
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as err:
        bad.whoami()
    assert err.value.response.status_code == 401

    # anonymous reads of public repos are fine
    assert HfApi(token=False).list_repo_files("test-user/existing") == [".gitattributes"]


# ---------------------------------------------------------------------------------------------------------------
# (3) 403 and 404
# ---------------------------------------------------------------------------------------------------------------


def test_forbidden_repo_is_403(local_hub: LocalHub):
    api = HfApi()
    local_hub.create_repo("test-org/locked")
    local_hub.forbidden_repos.add("test-org/locked")
    local_hub.forbidden_repos.add("frozen-org/*")

    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"data", path_in_repo="a.txt", repo_id="test-org/locked")
    assert err.value.response.status_code == 403
    assert "403 Forbidden" in str(err.value) and "test-org/locked" in str(err.value)
    assert local_hub.list_files("test-org/locked") == [".gitattributes"]

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("frozen-org/new-repo")
    assert err.value.response.status_code == 403
    # exist_ok on an existing but read-only repo succeeds, like on the Hub (falls back to repo_info)
    assert api.create_repo("test-org/locked", exist_ok=True).repo_id == "test-org/locked"
    # reading is still allowed
    assert api.list_repo_files("test-org/locked") == [".gitattributes"]


def test_missing_repo_revision_and_file_are_404(local_hub: LocalHub, tmp_path: Path):
    from transformers import AutoConfig

    api = HfApi()
    with pytest.raises(RepositoryNotFoundError) as err:
        api.repo_info("test-user/does-not-exist")
    assert err.value.response.status_code == 404
    assert err.value.response.headers["X-Error-Code"] == "RepoNotFound"

    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("test-user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/does-not-exist", "config.json", cache_dir=tmp_path / "c")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="test-user/does-not-exist")
    with pytest.raises(OSError, match="does-not-exist"):
        AutoConfig.from_pretrained("test-user/does-not-exist", cache_dir=tmp_path / "c")

    local_hub.upload_files("test-user/exists", {"config.json": "{}"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("test-user/exists", "missing.json", cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("test-user/exists", "config.json", revision="no-such-branch", cache_dir=tmp_path / "c")

    # private repos are invisible without a valid token
    local_hub.create_repo("test-user/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).repo_info("test-user/secret")
    assert api.repo_info("test-user/secret").private is True


# ---------------------------------------------------------------------------------------------------------------
# (4) fault injection: a failed commit leaves the repo untouched
# ---------------------------------------------------------------------------------------------------------------


def test_injected_commit_failure_is_atomic(local_hub: LocalHub, tmp_path: Path):
    api = HfApi()
    repo_id = "test-user/atomic"
    api.create_repo(repo_id)
    first = _write_folder(tmp_path / "v1", {"a.txt": b"a1", "sub/b.txt": b"b1"})
    api.upload_folder(repo_id=repo_id, folder_path=first)
    files_before = api.list_repo_files(repo_id)
    contents_before = local_hub.files(repo_id)
    head_before = local_hub.head(repo_id)

    ops = [
        CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"a2"),
        CommitOperationAdd(path_in_repo="new.txt", path_or_fileobj=b"new"),
        CommitOperationDelete(path_in_repo="sub/b.txt"),
    ]
    local_hub.fail_next_commit = 500
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(repo_id=repo_id, operations=ops, commit_message="doomed")
    assert err.value.response.status_code == 500
    assert local_hub.fail_next_commit is None  # consumed
    assert api.list_repo_files(repo_id) == files_before
    assert local_hub.files(repo_id) == contents_before
    assert local_hub.head(repo_id) == head_before

    # a fault that persists for several requests
    local_hub.inject_fault("commit", status=503, times=2)
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"a3", path_in_repo="a.txt", repo_id=repo_id)
        assert err.value.response.status_code == 503
    assert local_hub.files(repo_id) == contents_before

    # the hub recovers: the same operations now go through in one commit
    ops = [
        CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"a2"),
        CommitOperationAdd(path_in_repo="new.txt", path_or_fileobj=b"new"),
        CommitOperationDelete(path_in_repo="sub/b.txt"),
    ]
    api.create_commit(repo_id=repo_id, operations=ops, commit_message="ok")
    assert local_hub.files(repo_id) == {".gitattributes": contents_before[".gitattributes"], "a.txt": b"a2", "new.txt": b"new"}


# ---------------------------------------------------------------------------------------------------------------
# (5) snapshot_download into a fresh cache
# ---------------------------------------------------------------------------------------------------------------


def test_snapshot_download_into_fresh_cache(local_hub: LocalHub, tmp_path: Path):
    repo_id = "test-user/snap"
    payload = {
        "config.json": b'{"model_type": "llama"}',
        "weights/part-1.bin": os.urandom(3000),
        "weights/part-2.bin": os.urandom(10),
        "README.md": b"# snap\n",
    }
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=_write_folder(tmp_path / "src", payload))

    cache = tmp_path / "fresh-cache"
    path = Path(snapshot_download(repo_id, cache_dir=cache))
    assert path.parent.name == "snapshots" and path.name == local_hub.head(repo_id)
    for rel, data in payload.items():
        assert (path / rel).read_bytes() == data

    # filtering, explicit revisions and local_dir also work
    only = Path(snapshot_download(repo_id, cache_dir=tmp_path / "c2", allow_patterns=["weights/*"]))
    assert sorted(str(p.relative_to(only)) for p in only.rglob("*") if p.is_file()) == [
        "weights/part-1.bin",
        "weights/part-2.bin",
    ]
    first_commit = local_hub.commits(repo_id)[-1]["oid"]
    old = Path(snapshot_download(repo_id, revision=first_commit, cache_dir=tmp_path / "c3"))
    assert sorted(p.name for p in old.iterdir()) == [".gitattributes"]
    local = Path(snapshot_download(repo_id, local_dir=tmp_path / "local"))
    assert (local / "weights" / "part-1.bin").read_bytes() == payload["weights/part-1.bin"]
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []


def test_datasets_push_to_hub_and_load_dataset(local_hub: LocalHub):
    """datasets pre-uploads parquet shards through LFS (``lfs_patterns``), then load_dataset reads them back."""
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "n": [1, 2, 3]}).push_to_hub("test-user/tiny-ds")
    files = HfApi().list_repo_files("test-user/tiny-ds", repo_type="dataset")
    assert any(f.endswith(".parquet") for f in files)
    loaded = datasets.load_dataset("test-user/tiny-ds", split="train")
    assert loaded.to_dict() == {"text": ["a", "b", "c"], "n": [1, 2, 3]}
    assert str(datasets.config.HF_DATASETS_CACHE).startswith(str(Path(os.environ["HF_HOME"])))
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []


# ---------------------------------------------------------------------------------------------------------------
# plumbing: conftest points every library at the session hub before their import; the server stops and restarts
# ---------------------------------------------------------------------------------------------------------------


def test_the_session_points_every_library_at_the_local_hub(local_hub: LocalHub):
    import datasets.config
    import huggingface_hub

    assert constants.ENDPOINT == HfApi().endpoint == datasets.config.HF_ENDPOINT == local_hub.url
    assert local_hub.url.startswith("http://127.0.0.1:")
    assert huggingface_hub.whoami()["name"] == "test-user"  # the module-level HfApi, built at import
    assert not huggingface_hub.is_offline_mode() and not datasets.config.HF_HUB_OFFLINE
    assert constants.HF_HUB_DISABLE_XET is True
    home = Path(os.environ["HF_HOME"])  # the session's own, never the developer's cache
    assert home.name.startswith("hfprune-tests-hf-home-")
    assert Path(constants.HF_HUB_CACHE).is_relative_to(home)
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(home)


def test_a_served_snapshot_is_current_in_a_cache_that_holds_it(local_hub: LocalHub, tmp_path: Path):
    """What conftest does for the real SmolLM2 (fixture smollm2_path): the hub id loads, nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    from hfprune.offline import file_checkpoint

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "model")
    snapshot = file_checkpoint(tmp_path / "model", "test-org/served", cache_dir=tmp_path / "cache")
    local_hub.serve_snapshot("test-org/served", snapshot)
    local_hub.reset()  # a served snapshot stays
    assert local_hub.head("test-org/served") == snapshot.name
    assert local_hub.files("test-org/served")["config.json"] == (snapshot / "config.json").read_bytes()

    loaded = AutoModelForCausalLM.from_pretrained("test-org/served", cache_dir=tmp_path / "cache").eval()
    assert torch.equal(_logits(loaded), _logits(model))
    assert not local_hub.requests_to("/resolve/", method="GET")  # every file was current in the cache
    other = Path(snapshot_download("test-org/served", cache_dir=tmp_path / "elsewhere"))  # a cold cache downloads
    assert (other / "model.safetensors").read_bytes() == (snapshot / "model.safetensors").read_bytes()
    assert local_hub.unknown_routes == [] and local_hub.server_errors == []  # (stays served: a name no test uses)


def test_a_stopped_hub_frees_its_port_and_comes_back_on_it():
    import socket

    hub = LocalHub()
    with hub:
        url, thread = hub.url, hub._thread
        assert HfApi(endpoint=url, token=hub.token).whoami()["name"] == "test-user"
    assert not hub.running and thread is not None and not thread.is_alive()
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with hub:
        assert hub.url == url
        assert HfApi(endpoint=url, token=hub.token).whoami()["name"] == "test-user"
