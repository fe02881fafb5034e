"""Finished runs on disk, one JSON file a run, reused only when measured exactly as asked now.

A run's file holds its `RunResult` and the fingerprint of everything its numbers depend on
(`specs.fingerprint`: the resolved PruningConfig, the budget, the evaluation settings, the model).
Zero-shot accuracy is the one measurement a plan may add later: a run without it (or with another
row limit) is measured again when it is asked for.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from qualitybench.runs import RunResult
from qualitybench.specs import RunSpec, wants_zero_shot


class RunCache:
    def __init__(self, directory: Path, fingerprint: Callable[[RunSpec], dict], zero_shot: dict,
                 zero_shot_limit: Optional[int], rerun: tuple = ()):
        self.directory = directory
        self.fingerprint = fingerprint
        self.zero_shot = zero_shot
        self.zero_shot_limit = zero_shot_limit
        self.rerun = rerun  # shell patterns of keys measured again whatever is stored
        directory.mkdir(parents=True, exist_ok=True)

    def _file(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.key}.json"

    def get(self, spec: RunSpec, measure_now: bool = True) -> Optional[RunResult]:
        """The stored result, or None. `measure_now`: the run is one this invocation would measure, so
        `rerun` and the zero-shot it asks for apply; a run only shown in the report is taken as stored."""
        file = self._file(spec)
        if not file.exists() or measure_now and any(fnmatch.fnmatch(spec.key, p) for p in self.rerun):
            return None
        stored = json.loads(file.read_text())
        if stored.pop("_fingerprint", None) != self.fingerprint(spec):
            return None
        if measure_now and wants_zero_shot(self.zero_shot, spec) and \
                stored["zero_shot"].get("limit", -1) != self.zero_shot_limit:
            return None
        return RunResult(**stored)

    def put(self, spec: RunSpec, result: RunResult) -> None:
        from hfprune.atomic import write_text_atomic

        record = {**asdict(result), "_fingerprint": self.fingerprint(spec)}
        write_text_atomic(self._file(spec), json.dumps(record, indent=1, default=str))
