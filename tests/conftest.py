"""Shared set-up: a local Hub for the whole session, the offline data, the real SmolLM2-135M-Instruct.

huggingface_hub, transformers and datasets read their settings from the environment once, when they are
imported. This file is imported before any test module and imports no Hugging Face library before it has
set that environment, so nothing needs patching afterwards:

- ``HF_ENDPOINT`` is a :class:`~tests.hub_server.LocalHub` started here, once per session, on a free port
  of 127.0.0.1; ``HF_TOKEN`` is its write token; ``HF_HUB_DISABLE_XET=1`` (it speaks Git LFS, not Xet).
  Every hub call of the session (``push_to_hub``, ``from_pretrained`` / ``load_dataset`` of a hub id, in
  this process or in a subprocess) goes over real HTTP through huggingface_hub to that server, so no test
  can reach the internet.
- That is why the offline switches are off here (``HF_HUB_OFFLINE=0``, ``HF_DATASETS_OFFLINE=0``, whatever
  the Makefile exports for the demo and the benchmarks): "no network" is guaranteed by the endpoint, and
  the hub tests need huggingface_hub online. A process cannot be both offline and online, and no test
  process here has to be: a test that checks the user's offline path runs a subprocess with
  ``HF_HUB_OFFLINE=1`` (``tests/test_offline.py``).
- ``HF_HOME`` is a fresh directory for the session (hub and datasets caches, token files), so the tests
  never write the developer's cache.
- The real SmolLM2 stays in the developer's hub cache (the one the environment named before this file
  changed it): ``make test`` fills it first with ``python -m hfprune.offline``; the ``smollm2_path`` fixture
  does the same if needed and returns the snapshot directory. It also files that snapshot where the
  session's hub and cache both have it: the hub serves it as ``HuggingFaceTB/SmolLM2-135M-Instruct`` at the
  snapshot's own commit, and the session cache links that commit. So a test that asks for
  ``smollm2_path`` can also load the model by hub id (a recipe naming it, say) through the ordinary online
  code path, and huggingface_hub, finding every file current, copies and downloads nothing.
- The ``local_hub`` fixture hands a test the session hub, emptied (served snapshots stay); it restarts it
  on the same port if the test stopped it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HFPRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))

_HF_LIBRARIES = ("huggingface_hub", "transformers", "datasets")
_already = [name for name in _HF_LIBRARIES if name in sys.modules]
if _already:  # pragma: no cover - a plugin imported them before us
    raise pytest.UsageError(f"{_already} imported before tests/conftest.py could set HF_ENDPOINT and HF_HOME")


def _developer_hub_cache() -> Path:
    """The hub cache the environment names (huggingface_hub's documented order), before we change it."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


DEVELOPER_HUB_CACHE = _developer_hub_cache()

from tests.hub_server import LocalHub  # noqa: E402  (standard library only)

HUB = LocalHub(token="hf_test_token").start()
SESSION_HOME = Path(tempfile.mkdtemp(prefix="hfprune-tests-hf-home-"))


def _close_session() -> None:
    HUB.stop()
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


atexit.register(_close_session)

for _name in (  # each of these would override HF_HOME, or the endpoint / token set below
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
    "HF_TOKEN_PATH", "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN", "TRANSFORMERS_OFFLINE",
):
    os.environ.pop(_name, None)
os.environ.update(
    HF_ENDPOINT=HUB.url,
    HF_TOKEN=HUB.token,
    HF_HOME=str(SESSION_HOME),
    HF_HUB_OFFLINE="0",
    HF_DATASETS_OFFLINE="0",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
)

import torch  # noqa: E402

# Tests run on 2 cores next to each other's subprocesses: keep torch from oversubscribing.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two fighting over a busy CPU (`usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wiki_demo.txt").exists():
        pytest.skip(f"offline data not found in {DATA_DIR} (set HFPRUNE_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real pretrained SmolLM2-135M-Instruct in the developer's hub cache (converted there once)."""
    from hfprune.offline import OFFLINE_MODEL_ID, OfflineModelUnavailableError, ensure_offline_model

    try:
        snapshot = ensure_offline_model(cache_dir=DEVELOPER_HUB_CACHE)
    except OfflineModelUnavailableError as error:  # pragma: no cover - the Makefile installs it
        pytest.skip(str(error))
    _file_in_session(OFFLINE_MODEL_ID, snapshot)
    return snapshot


def _file_in_session(repo_id: str, snapshot: Path) -> None:
    """Make ``from_pretrained(repo_id)`` work in the session with nothing copied or downloaded: the session
    hub serves ``snapshot`` as ``repo_id`` at the snapshot's commit, and the session cache holds that commit
    (a link to the snapshot, and ``refs/main``), so huggingface_hub finds every file current."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    HUB.serve_snapshot(repo_id, snapshot)
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "snapshots").mkdir(parents=True, exist_ok=True)
    if not (repo / "snapshots" / snapshot.name).exists():
        (repo / "snapshots" / snapshot.name).symlink_to(snapshot, target_is_directory=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot.name)


@pytest.fixture
def local_hub():
    """The session's :class:`~tests.hub_server.LocalHub` (token ``hf_test_token``, user ``test-user``, org
    ``test-org``), emptied for this test. Tweak it inside the test (``local_hub.forbidden_repos.add(...)``,
    ``local_hub.fail_next_commit = 500``, ``local_hub.lfs_threshold = 0``, ...)."""
    import huggingface_hub

    HUB.reset()
    yield HUB
    HUB.reset()  # what the test pushed is no other test's business
    if not HUB.running:  # the test took the hub down: bring it back where HF_ENDPOINT points
        HUB.start()
        huggingface_hub.close_session()  # pooled connections point at the old server


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama saved with its tokenizer (`tiny_models.save_tiny`), once per test module."""
    from .tiny_models import save_tiny

    path = tmp_path_factory.mktemp("tiny") / "base"
    save_tiny("llama", path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a job loads a model or builds its trainer: the error must come before that."""
    import hfprune.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(hfprune.trainer, "load_model", refuse)
    monkeypatch.setattr(hfprune.trainer.PruningTrainer, "__init__", refuse)
