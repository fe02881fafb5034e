"""Third-party log messages that are not the user's business, dropped narrowly.

Each filter sits on the one logger that emits the message and matches the message's exact opening
words, so everything else those libraries say still reaches the user. They are installed where
hfprune imports the library (bitsandbytes: the package ``__init__``, since peft imports it as soon as
transformers' Trainer is; lm-eval: ``evaluation.zero_shot``).
"""

from __future__ import annotations

import logging
import re
from typing import Union

# bitsandbytes, on CPUs with AVX512-BF16, tries at import to fetch an optional 4-bit kernel from the
# hub's `kernels-community` (package `kernels`) and warns when it cannot; 4-bit then uses its own kernel.
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


Message = Union[str, "re.Pattern[str]"]


class DropMessages(logging.Filter):
    """Drops the records whose formatted message starts with one of ``messages`` (text, or a regex
    matched at the start)."""

    def __init__(self, messages: tuple[Message, ...]):
        super().__init__()
        self.messages = messages
        self._patterns = [m if isinstance(m, re.Pattern) else re.compile(re.escape(m)) for m in messages]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self._patterns)


def drop_messages(logger_name: str, *messages: Message) -> None:
    """Drop ``logger_name``'s records starting with ``messages`` (installed once per process and logger)."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessages) and f.messages == messages for f in target.filters):
        target.addFilter(DropMessages(messages))


def quiet_bitsandbytes_import() -> None:
    drop_messages(BNB_CPU_OPS_LOGGER, BNB_KERNELS_WARNING)
