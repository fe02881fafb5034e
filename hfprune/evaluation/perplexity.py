"""Language-modelling perplexity, computed the way the pruning papers do.

LLM-Pruner and LoRAPrune (which reuses LLM-Pruner's evaluation code) join the
test split with ``"\\n\\n"``, tokenise the result once, cut it into
non-overlapping windows of ``seq_len`` tokens, drop the last partial window,
run every window independently (no context carried over) and report
``exp(mean token NLL)`` over all predicted tokens, i.e. ``seq_len - 1``
predictions per window. ``perplexity`` reproduces exactly that by default.

Tail convention (``tail=``):

* ``"drop"`` (default, as in the papers): the last ``n_tokens % seq_len``
  tokens are not evaluated.
* ``"include"``: the tail is evaluated as one more, shorter, independent window
  (``tail_len - 1`` predictions). A tail of a single token predicts nothing and
  is not counted as a window.

``max_windows`` keeps the first ``max_windows`` windows in text order (the
tail, when included, is the last one), so quick runs see the same prefix of
the corpus for every model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

# Hub sources by short name: (path, config name, split, text field, max documents).
# ptb: LLM-Pruner's loader evaluates the *validation* split; the test split is
# the conventional PTB test set and what this package reports.
# c4: the validation shard used by SparseGPT / Wanda / LLM-Pruner's calibration
# code; its first 1100 documents, as in SparseGPT, keep tokenisation cheap.
HUB_SOURCES: dict[str, dict] = {
    "wikitext2": {
        "path": "wikitext",
        "name": "wikitext-2-raw-v1",
        "split": "test",
        "field": "text",
        "max_texts": None,
    },
    "ptb": {
        "path": "ptb_text_only",
        "name": "penn_treebank",
        "split": "test",
        "field": "sentence",
        "max_texts": None,
    },
    "c4": {
        "path": "allenai/c4",
        "name": None,
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "split": "validation",
        "field": "text",
        "max_texts": 1100,
    },
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
TAIL_MODES = ("drop", "include")
# An evaluation the first window says will take longer than this is worth a suggestion: the defaults
# (WikiText-2 at 2048 tokens, ~140 windows) took 10 min 36 s for one number on a 2-core CPU.
LONG_RUN_SECONDS = 120.0
QUICK_RUN_SECONDS = 60.0  # what the suggested max_windows aims at

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    """Perplexity of one model on one source.

    ``nll`` is the mean negative log-likelihood (nats) per predicted token,
    ``ppl = exp(nll)``; ``n_tokens`` counts predicted tokens, ``n_windows`` the
    windows evaluated (including the tail window when it was evaluated).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    source: str
    tail: str = "drop"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- text sources


def load_texts(source: str | os.PathLike | Sequence[str], text_field: str = "text") -> list[str]:
    """Return the documents of ``source`` as a list of strings.

    ``source`` is a hub short name (``wikitext2``, ``ptb``, ``c4``), a local
    ``.txt`` (one document per line, blank lines skipped), ``.jsonl`` or
    ``.json`` file (records with a ``text_field`` string, or a JSON list of
    strings), or an in-memory sequence of strings.
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("source: an in-memory source must be a sequence of strings")
        return texts
    if isinstance(source, str) and source in HUB_SOURCES:
        return _load_hub_texts(source)
    path = Path(source)
    looks_like_path = path.suffix in LOCAL_SUFFIXES or os.sep in str(source) or path.exists()
    if not looks_like_path:
        raise ValueError(
            f"source={str(source)!r}: unknown data set; valid sources are "
            f"{', '.join(HUB_SOURCES)} or a path to a {'/'.join(LOCAL_SUFFIXES)} file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"source={str(source)!r}: no such file; valid sources are {', '.join(HUB_SOURCES)} "
            f"or an existing {'/'.join(LOCAL_SUFFIXES)} file"
        )
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        return _texts_from_records(records, text_field, path)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"source={str(path)!r}: a .json source must hold a list, got {type(data).__name__}")
        return _texts_from_records(data, text_field, path)
    raise ValueError(
        f"source={str(source)!r}: unsupported file type {path.suffix!r}; valid types are "
        f"{', '.join(LOCAL_SUFFIXES)}"
    )


def _load_hub_texts(name: str) -> list[str]:
    from datasets import load_dataset  # imported lazily: slow, and local sources do not need it

    spec = HUB_SOURCES[name]
    kwargs = {"split": spec["split"]}
    if spec.get("data_files"):
        kwargs["data_files"] = spec["data_files"]
    dataset = load_dataset(spec["path"], spec["name"], **kwargs)
    if spec["max_texts"] is not None:
        dataset = dataset.select(range(min(spec["max_texts"], len(dataset))))
    return list(dataset[spec["field"]])


def _texts_from_records(records: list, text_field: str, path: Path) -> list[str]:
    texts = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            texts.append(record)
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            texts.append(record[text_field])
        else:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"source={str(path)!r}: record {i} has no string field text_field={text_field!r} "
                f"(found {keys})"
            )
    return texts


# ---------------------------------------------------------------- windows


def split_windows(input_ids: torch.Tensor, seq_len: int, tail: str = "drop") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a 1-D token tensor into ``(full windows [n, seq_len], tail or None)``.

    The tail is returned only for ``tail="include"`` and only when it holds at
    least two tokens (one token predicts nothing).
    """
    _check_seq_len(seq_len)
    _check_tail(tail)
    n_full = input_ids.numel() // seq_len
    windows = input_ids[: n_full * seq_len].view(n_full, seq_len)
    rest = input_ids[n_full * seq_len :]
    tail_window = rest if tail == "include" and rest.numel() >= 2 else None
    return windows, tail_window


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len <= 1:
        raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 2 (a window needs a token to predict)")


def _check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r}: valid values are {', '.join(TAIL_MODES)}")


# ---------------------------------------------------------------- evaluation


def _input_device(model: torch.nn.Module) -> torch.device:
    # With a device_map the embedding decides where inputs must live.
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def window_nll_sum(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Sum of next-token NLLs over a ``[batch, len]`` block of independent windows."""
    windows = windows.to(_input_device(model))
    logits = model(input_ids=windows, use_cache=False).logits
    # float32 log-softmax: bf16/fp16 logits lose too much precision for a
    # mean over ~10^5 tokens.
    shift_logits = logits[:, :-1, :].float()
    shift_labels = windows[:, 1:].to(shift_logits.device)
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
    )
    return float(loss)


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    source: str | os.PathLike | Sequence[str],
    seq_len: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    tail: Literal["drop", "include"] = "drop",
    text_field: str = "text",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``source`` (see the module docstring).

    ``source`` is anything :func:`load_texts` accepts. The model is put in eval
    mode for the run and its previous mode is restored afterwards.
    """
    _check_seq_len(seq_len)
    _check_tail(tail)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}: must be None or an integer >= 1")

    texts = load_texts(source, text_field=text_field)
    # verbose=False: the text is longer than the model's context on purpose (it is cut into windows
    # below), so transformers' "sequence length is longer than the specified maximum" is no news.
    input_ids = tokenizer("\n\n".join(texts), return_tensors="pt", verbose=False).input_ids[0]
    windows, tail_window = split_windows(input_ids, seq_len, tail)
    if max_windows is not None:
        if max_windows <= windows.size(0):
            tail_window = None  # the cap cuts the text before its tail
        windows = windows[:max_windows]
    blocks = list(windows.split(batch_size)) if windows.size(0) else []
    if tail_window is not None:
        blocks.append(tail_window.unsqueeze(0))
    if not blocks:
        raise ValueError(
            f"source={_source_name(source)!r}: {input_ids.numel()} tokens make no window of "
            f"seq_len={seq_len} (tail={tail!r}); use a shorter seq_len or more text"
        )

    was_training = model.training
    model.eval()
    try:
        iterator = blocks
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(blocks, desc=f"ppl {_source_name(source)}", unit="batch")
        nll_sum = 0.0
        for index, block in enumerate(iterator):
            started = time.perf_counter()
            nll_sum += window_nll_sum(model, block)
            if index == 0 and len(blocks) > 1:
                note = long_run_note(_source_name(source), windows.size(0), seq_len, batch_size,
                                     time.perf_counter() - started, len(blocks))
                if note is not None:
                    logger.warning(note)
    finally:
        model.train(was_training)

    n_tokens = sum(block.numel() - block.size(0) for block in blocks)
    nll = nll_sum / n_tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=n_tokens,
        n_windows=sum(block.size(0) for block in blocks),
        seq_len=seq_len,
        source=_source_name(source),
        tail=tail,
    )


def long_run_note(source: str, n_windows: int, seq_len: int, batch_size: int, first_block_seconds: float,
                  n_blocks: int) -> str | None:
    """What the first block says the whole source will take, and how to make it quick, when that is longer than
    LONG_RUN_SECONDS; None otherwise. Named for the command line and the Python API alike."""
    total = first_block_seconds * n_blocks
    if total <= LONG_RUN_SECONDS:
        return None
    per_window = first_block_seconds / batch_size
    quick = max(1, int(QUICK_RUN_SECONDS / per_window))
    return (
        f"perplexity {source}: {n_windows} windows of {seq_len} tokens ({n_windows * seq_len} tokens) at "
        f"{per_window:.1f} s a window here: about {_duration(total)} for this model. For a quick number pass "
        f"--max-windows {quick} (max_windows={quick}; about {_duration(quick * per_window)}), or a shorter "
        f"--seq-len such as 512 (the papers report 2048, so keep it for numbers you compare with them)"
    )


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<texts>"
