"""Third-party noise that is not the user's business is dropped, narrowly (hfprune/quiet.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hfprune.quiet import BNB_KERNELS_WARNING, drop_messages

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and peft
def test_importing_hfprune_drops_the_bitsandbytes_kernels_warning():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {
        code: subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for code in ("import bitsandbytes", "import hfprune.trainer")  # both at once: ~10 s, not 20
    }
    stderr = {code: run.communicate(timeout=300)[1] for code, run in runs.items()}
    assert [run.returncode for run in runs.values()] == [0, 0], stderr
    if BNB_KERNELS_WARNING not in stderr["import bitsandbytes"]:
        pytest.skip("bitsandbytes logs no kernels-community warning on this CPU (no AVX512-BF16): nothing to drop")
    assert BNB_KERNELS_WARNING not in stderr["import hfprune.trainer"]  # trainer imports it (through peft)


def test_only_the_named_messages_of_the_named_logger_are_dropped(caplog):
    name = "tests.quiet.example"
    drop_messages(name, "Failed to load X", re.compile(r"num \S+ from None to 0$"))
    drop_messages(name, "Failed to load X", re.compile(r"num \S+ from None to 0$"))  # installed once
    assert len(logging.getLogger(name).filters) == 1
    with caplog.at_level(logging.INFO):
        for logger, message in ((name, "Failed to load X: no module"), (name, "num task from None to 0"),
                                (name, "Failed to load Y"), (name, "num task from 5 to 0"),
                                ("tests.quiet.other", "Failed to load X: no module")):
            logging.getLogger(logger).warning("%s", message)
    kept = [(r.name, r.getMessage()) for r in caplog.records]
    assert kept == [(name, "Failed to load Y"), (name, "num task from 5 to 0"),
                    ("tests.quiet.other", "Failed to load X: no module")]
