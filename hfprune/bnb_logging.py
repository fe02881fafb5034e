"""bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 matmul with fp32 or bf16
inputs: hundreds of lines per training step on the CPU. Scoring and pruning say it once per process."""

from __future__ import annotations

import logging


class _FirstOnly(logging.Filter):
    """Lets the first record starting with `prefix` through, drops the repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 matmul with fp32 or bf16
    inputs (hundreds per step on the CPU); say it once per process."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in bnb_logger.filters):
        bnb_logger.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))
