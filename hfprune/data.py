"""Instruction data for recovery and calibration.

The record formats are recognised by their fields (trl's names, so a data set prepared for
`SFTTrainer` works unchanged):

    alpaca             {"instruction", "input", "output"}     Alpaca template (as LLM-Pruner's recovery)
    prompt_completion  {"prompt", "completion"}               trl's prompt-completion: two strings, or two
                                                              message lists (conversational, chat template)
    chat               {"messages": [{"role", "content"}, ...]}   the tokenizer's chat template; trains on the
                                                              last message, which must be the assistant's
    text               {"text"}                               plain language-model text

Prompt tokens are masked from the loss (label -100) by default, so recovery
trains on the responses only; `train_on_prompt=True` trains on everything.
Already tokenised data sets (an `input_ids` column) pass through untouched.
A record with no response token left within `max_length` teaches nothing and is
dropped (the count is logged); a data set left with no record is an error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMATS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
    "tokenized": ("input_ids",),
}


def detect_format(columns: Iterable[str]) -> str:
    columns = set(columns)
    for name, required in FORMATS.items():
        if set(required) <= columns:
            return name
    raise ValueError(
        f"data set columns {sorted(columns)} match no known format; expected one of: "
        + "; ".join(f"{name}: {list(fields)}" for name, fields in FORMATS.items())
    )


def alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens `a` and `b` share at the start: where the response starts when the prompt's last token
    merges with the response's first (as trl's SFTTrainer finds it)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, prompt: list, conversation: list) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, ids of the whole conversation), through the chat template."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
    return _encode(tokenizer, prompt_text, False), _encode(tokenizer, full_text, False)


def _prompt_completion_ids(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        ids = _encode(tokenizer, prompt + completion, True)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return _encode(tokenizer, prompt, True), ids
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational: lists of messages
        return _chat_ids(tokenizer, prompt, prompt + completion)
    raise ValueError(
        f"prompt/completion record with a {type(prompt).__name__} prompt and a {type(completion).__name__} "
        "completion: both must be strings, or both lists of {'role', 'content'} messages"
    )


def tokenize_record(record: dict, tokenizer, fmt: str, max_length: int, train_on_prompt: bool = False) -> dict:
    """input_ids / attention_mask / labels for one record, prompt tokens masked with -100."""
    if fmt == "text":
        ids = _encode(tokenizer, record["text"], True)[:max_length]
        if tokenizer.eos_token_id is not None and len(ids) < max_length:
            ids.append(tokenizer.eos_token_id)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    if fmt == "alpaca":
        prompt = alpaca_prompt(record)
        full = prompt + record["output"]
        prompt_ids = _encode(tokenizer, prompt, True)
        ids = _encode(tokenizer, full, True)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    elif fmt == "prompt_completion":
        prompt_ids, ids = _prompt_completion_ids(record, tokenizer)
    elif fmt == "chat":
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("chat records must end with an assistant message (the response to train on)")
        prompt_ids, ids = _chat_ids(tokenizer, messages[:-1], messages)
    else:
        raise ValueError(f"format={fmt!r}: must be one of alpaca, prompt_completion, chat, text")
    ids = ids[:max_length]
    labels = list(ids)
    if not train_on_prompt:
        masked = _common_prefix(prompt_ids, ids)
        labels[:masked] = [-100] * masked
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def check_records(dataset, what: str = "dataset") -> str:
    """The format of a data set, checked before anything expensive: it must have records and the columns of a
    known format. Returns the format name; ValueError naming `what` otherwise."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"{what} is a {type(dataset).__name__}: expected a datasets.Dataset (e.g. "
                        "datasets.Dataset.from_list(records)) of alpaca, prompt/completion, messages, text or tokenised records")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{what} is empty (0 records, columns {list(columns)}): give at least one record")
    try:
        return detect_format(columns)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def longest_sequence(dataset) -> int:
    """Tokens in the longest `input_ids` of a tokenised data set (0 when it cannot tell, e.g. streamed)."""
    if not hasattr(dataset, "__len__") or "input_ids" not in (getattr(dataset, "column_names", None) or ()):
        return 0
    import pyarrow.compute as pc

    if len(dataset) == 0:
        return 0
    column = dataset.with_format("arrow")["input_ids"]  # the rows of this view, without copying to Python
    return int(pc.max(pc.list_value_length(column)).as_py() or 0)


def prepare_dataset(dataset, tokenizer, max_length: int = 512, train_on_prompt: bool = False, num_proc=None,
                    what: str = "dataset"):
    """Tokenise a `datasets.Dataset` of alpaca / prompt-completion / chat / text records (tokenised ones pass
    through); records with no response token within `max_length` are dropped and counted in the log.

    `what` names the data set in messages (train_dataset, data.train[0] ...). Raises ValueError when no record
    is left, naming `max_length` and `train_on_prompt`: call it before loading a model."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be at least 2 tokens")
    fmt = detect_format(dataset.column_names)
    if fmt == "tokenized":
        return dataset
    if tokenizer is None:
        raise ValueError(f"a processing_class (tokenizer) is needed to tokenise {fmt!r} records")
    tokenized = dataset.map(
        lambda record: tokenize_record(record, tokenizer, fmt, max_length, train_on_prompt),
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing {fmt} records",
    )
    # labels[0] is never predicted (the loss shifts by one): a record needs a response label after it.
    kept = tokenized.filter(lambda r: any(label != -100 for label in r["labels"][1:]), desc="Dropping empty targets")
    dropped = len(tokenized) - len(kept)
    if len(kept) == 0:
        masked = "" if train_on_prompt else " (prompt tokens are not trained on: train_on_prompt=False)"
        raise ValueError(
            f"{what}: none of its {len(tokenized)} {fmt} records has a response token left to train on within "
            f"max_length={max_length}{masked}; raise max_length, pass train_on_prompt=True, or check the "
            "response field"
        )
    if dropped:
        logger.warning("%s: %d of %d %s records dropped: no response token left to train on within max_length=%d "
                       "(an empty response, or a prompt that fills it)", what, dropped, len(tokenized), fmt, max_length)
    return kept


def load_records(source: str, split: str = "train"):
    """A `datasets.Dataset` from a local .json/.jsonl/.txt file or a hub data set id."""
    import datasets

    if os.path.exists(source):
        if source.endswith((".json", ".jsonl")):
            with open(source, "rb") as handle:
                if not handle.read(1 << 16).strip():  # the json loader fails on an empty file with StopIteration
                    raise ValueError(f"data file {source!r} is empty: no records")
            try:
                records = datasets.load_dataset("json", data_files=source, split="train")
            except (StopIteration, ValueError) as error:
                if "corresponds to no data" not in str(error) and not isinstance(error, StopIteration):
                    raise
                raise ValueError(f"data file {source!r} holds no records") from None
            if len(records) == 0:
                raise ValueError(f"data file {source!r} holds no records")
            return records
        if source.endswith(".txt"):
            with open(source, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle if line.strip()]
            return datasets.Dataset.from_dict({"text": lines})
        raise ValueError(f"data file {source!r}: expected a .json, .jsonl or .txt file")
    return datasets.load_dataset(source, split=split)


def calibration_batches(
    tokenizer, texts: list[str], num_samples: int = 16, seq_len: int = 128, batch_size: int = 4, seed: int = 0
) -> list[dict]:
    """Random windows of `seq_len` tokens from `texts` (LLM-Pruner's calibration), as batches."""
    generator = torch.Generator().manual_seed(seed)
    # verbose=False: longer than the model's context on purpose (cut into windows), so no length warning.
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"])
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens: need more than seq_len={seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return [{"input_ids": windows[i : i + batch_size]} for i in range(0, num_samples, batch_size)]


def read_texts(path: str, field: str = "text", limit: Optional[int] = None) -> list[str]:
    """Documents from a .txt (one per line) or .jsonl/.json file."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            texts = [json.loads(line)[field] for line in handle if line.strip()]
        elif path.endswith(".json"):
            texts = [record[field] for record in json.load(handle)]
        else:
            texts = [line.strip() for line in handle if line.strip()]
    return texts[:limit] if limit else texts
