"""pytest fixtures pointing ``huggingface_hub`` / ``transformers`` (/ ``datasets``) at a :class:`LocalHub`.

Use in a test module with::

    from tests.hub_fixtures import local_hub  # noqa: F401

or ``pytest_plugins = ["tests.hub_fixtures"]`` in a (future) ``tests/conftest.py``.

``HF_ENDPOINT`` and friends are read once, at import time, into module constants, so setting the environment
variables is not enough once ``huggingface_hub`` is imported: :func:`point_hf_to_local_hub` also patches every
cached copy (see its docstring). Everything is undone by ``monkeypatch`` at teardown.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hub_server import LocalHub


__all__ = ["local_hub", "point_hf_to_local_hub", "reset_hf_clients"]


def reset_hf_clients() -> None:
    """Drop pooled HTTP connections and cached clients that may point at a previous endpoint."""
    from huggingface_hub.utils import _http

    _http.close_session()
    try:
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()
    except Exception:  # pragma: no cover - fsspec flavour differences
        pass


def point_hf_to_local_hub(monkeypatch: pytest.MonkeyPatch, hub: LocalHub, home: str | os.PathLike) -> None:
    """Point huggingface_hub / transformers / datasets at ``hub`` with a fresh cache under ``home``.

    Environment (for code that reads it at call time, and for subprocesses / late imports):
    ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
    ``HF_TOKEN_PATH``, ``HF_DATASETS_CACHE``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``; unsets
    the offline switches, ``HUGGING_FACE_HUB_TOKEN``, ``HF_OIDC_RESOURCE``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``,
    ``HUGGINGFACE_HUB_CACHE``, ``HUGGINGFACE_CO_STAGING``.

    Import-time copies that are patched:

    - ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url``),
      ``HF_URL_HOSTS``, ``HF_HOME``, ``HF_HUB_CACHE``/``HUGGINGFACE_HUB_CACHE``, ``HF_ASSETS_CACHE``/
      ``HUGGINGFACE_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``,
      ``HF_HUB_DISABLE_XET`` (else hf_xet, which is installed, is used for LFS uploads), ``HF_HUB_OFFLINE``,
      ``HF_HUB_DISABLE_IMPLICIT_TOKEN``, ``HF_HUB_DISABLE_TELEMETRY``;
    - ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi()`` behind ``huggingface_hub.create_repo``,
      ``upload_folder``, ``list_repo_files``, ... was built at import time with the old endpoint;
    - ``huggingface_hub.utils._http._HUB_ORIGINS`` (origins trusted when following redirects);
    - ``huggingface_hub.utils._cache_manager.HF_HUB_CACHE`` and ``_cache_assets.HF_ASSETS_CACHE``
      (``from ..constants import`` copies);
    - ``transformers.utils.hub._hf_api`` -> ``None``: transformers lazily caches one ``HfApi`` (endpoint frozen
      at creation) for ``push_to_hub``/``create_commit``; reset so a fresh one is built against the local hub;
    - ``datasets.config``: ``HF_ENDPOINT``, ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE`` and the cache paths
      (``HF_CACHE_HOME``, ``HF_DATASETS_CACHE``, ``HF_MODULES_CACHE``, ``DOWNLOADED_DATASETS_PATH``,
      ``EXTRACTED_DATASETS_PATH``).

    transformers and datasets (when installed) are imported first, so that their import-time constants are
    taken from the original environment and restored by ``monkeypatch``.
    """
    # Import what caches endpoint-derived state *before* the environment changes: a first import while the
    # patches are active would freeze the local hub's URL into module constants beyond this test.
    import importlib

    for optional in ("transformers.utils.hub", "datasets.config"):
        try:
            importlib.import_module(optional)
        except ImportError:
            pass

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import hf_api as _hf_api_mod
    from huggingface_hub.utils import _http

    url = hub.url.rstrip("/")
    home = Path(home)
    hub_cache = home / "hub"
    assets_cache = home / "assets"
    xet_cache = home / "xet"
    token_path = home / "token"
    hub_cache.mkdir(parents=True, exist_ok=True)

    # --- environment -------------------------------------------------------------------------------------
    env = {
        "HF_ENDPOINT": url,
        "HF_TOKEN": hub.token,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HF_XET_CACHE": str(xet_cache),
        "HF_TOKEN_PATH": str(token_path),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_CO_STAGING",
    ):
        monkeypatch.delenv(key, raising=False)

    # --- huggingface_hub import-time constants -----------------------------------------------------------
    host = urlsplit(url).hostname or "127.0.0.1"
    consts = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets_cache),
        "HUGGINGFACE_ASSETS_CACHE": str(assets_cache),
        "HF_XET_CACHE": str(xet_cache),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in consts.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # `from .constants import HUGGINGFACE_CO_URL_TEMPLATE` re-export at package level
    if "HUGGINGFACE_CO_URL_TEMPLATE" in vars(huggingface_hub):
        monkeypatch.setattr(huggingface_hub, "HUGGINGFACE_CO_URL_TEMPLATE", consts["HUGGINGFACE_CO_URL_TEMPLATE"])

    monkeypatch.setattr(_hf_api_mod.api, "endpoint", url)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(url)}))

    from huggingface_hub.utils import _cache_assets, _cache_manager

    if hasattr(_cache_manager, "HF_HUB_CACHE"):
        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    if hasattr(_cache_assets, "HF_ASSETS_CACHE"):
        monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets_cache))

    # --- transformers ------------------------------------------------------------------------------------
    tf_hub = sys.modules.get("transformers.utils.hub")
    if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
        monkeypatch.setattr(tf_hub, "_hf_api", None)

    # --- datasets ----------------------------------------------------------------------------------------
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_cache = home / "datasets"
        ds_values = {
            "HF_ENDPOINT": url,
            "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_CACHE_HOME": str(home),
            "HF_DATASETS_CACHE": ds_cache,
            "HF_MODULES_CACHE": home / "modules",
            "DOWNLOADED_DATASETS_PATH": ds_cache / "downloads",
            "EXTRACTED_DATASETS_PATH": ds_cache / "downloads" / "extracted",
        }
        for name, value in ds_values.items():
            if hasattr(ds_config, name):
                monkeypatch.setattr(ds_config, name, value)

    reset_hf_clients()


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running :class:`LocalHub` (token ``hf_test_token``, user ``test-user``, org ``test-org``) with
    huggingface_hub / transformers pointed at it and a fresh HF cache in ``tmp_path / "hf_home"``.

    Tweak it inside the test (``local_hub.forbidden_repos.add(...)``, ``local_hub.fail_next_commit = 500``,
    ``local_hub.lfs_threshold = 0``, ...).
    """
    hub = LocalHub(token="hf_test_token")
    hub.start()
    try:
        point_hf_to_local_hub(monkeypatch, hub, tmp_path / "hf_home")
        yield hub
    finally:
        reset_hf_clients()  # close pooled keep-alive connections before the server goes away
        hub.stop()
