"""The text of the quality benchmark: held-out evaluation text, training streams, calibration batches.

* Held out: `wiki_demo.txt` and C4 documents [0:`c4_eval_docs`); nothing trains or calibrates on them.
* Training and calibration: C4 documents [`c4_train_docs`) and the Alpaca records.
* A training stream is the exact sequence of records a run reads, in order (the Trainer samples
  sequentially), built from the run's seed: hfprune and Torch-Pruning at the same seed read the
  same batches, and Torch-Pruning's calibration batches are the first `pruning_steps` of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import common
from qualitybench.specs import Budget, parse_calibration

COLUMNS = ("input_ids", "attention_mask", "labels")


@dataclass
class Texts:
    wiki: list
    c4_eval: list
    c4_train: list
    alpaca: list

    @classmethod
    def load(cls, c4_eval_docs: int, c4_train_docs: tuple, wiki_limit=None) -> "Texts":
        from hfprune.data import read_texts

        c4 = common.read_c4()
        lo, hi = c4_train_docs
        texts = cls(wiki=read_texts(str(common.DATA_DIR / "wiki_demo.txt"))[:wiki_limit], c4_eval=c4[:c4_eval_docs],
                    c4_train=c4[lo:hi], alpaca=common.read_alpaca())
        if c4_eval_docs > lo or set(texts.c4_eval) & set(texts.c4_train):
            raise ValueError(f"c4_eval_docs={c4_eval_docs}, c4_train_docs={c4_train_docs}: held-out C4 documents "
                             "would be trained on")
        return texts


def _records(tokenizer, texts: list, fmt: str, seq_len: int) -> list[dict]:
    from hfprune.data import tokenize_record

    records = [tokenize_record(t if fmt == "alpaca" else {"text": t}, tokenizer, fmt, seq_len) for t in texts]
    # A truncated prompt leaves nothing to learn: drop records without a single target token.
    return [r for r in records if any(label != -100 for label in r["labels"][1:])]


def _shuffled(records: list, seed: int) -> list:
    records = list(records)
    random.Random(seed).shuffle(records)
    return records


def training_stream(tokenizer, texts: Texts, order: str, budget: Budget, seed: int):
    """The records a run reads, in order, as a `datasets.Dataset` of at least `steps x batch_size` records.

    mix:      C4 and Alpaca shuffled together;
    c4-first: the pruning stage reads C4 documents only, then the mix (what Torch-Pruning calibrates on);
    phases:   all C4 documents, then all Alpaca records (the quality recipes' `mixing: phases`).
    """
    import datasets

    c4 = _shuffled(_records(tokenizer, texts.c4_train, "text", budget.seq_len), seed)
    alpaca = _shuffled(_records(tokenizer, texts.alpaca, "alpaca", budget.seq_len), seed + 1)
    mix = _shuffled(c4 + alpaca, seed)
    if order == "mix":
        stream = mix
    elif order == "c4-first":
        stream = c4[: budget.pruning_steps * budget.batch_size] + mix
    elif order == "phases":
        stream = c4 + alpaca
    else:
        raise ValueError(f"data order {order!r}: must be mix, c4-first or phases")
    needed = max(1, budget.steps) * budget.batch_size
    while len(stream) < needed:  # small smoke sets: read the stream again rather than stop early
        stream = stream + stream
    return datasets.Dataset.from_dict({k: [r[k] for r in stream] for k in COLUMNS})


def first_batches(stream, tokenizer, batches: int, batch_size: int) -> list[dict]:
    """The first `batches` batches of a stream, collated as the Trainer collates them (padding, labels -100)."""
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return [collate([stream[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(batches)]


def calibration_batches(tokenizer, texts: Texts, calibration: str, seed: int) -> list[dict]:
    """LLM-Pruner's calibration: N random windows of L tokens of the training C4 documents, in batches of
    at most 2048 tokens (10 x 64: one batch; 64 x 256: 8 batches of 8)."""
    from hfprune.data import calibration_batches as windows

    count, length = parse_calibration(calibration)
    batch = max(d for d in range(1, count + 1) if count % d == 0 and (d * length <= 2048 or d == 1))
    return windows(tokenizer, texts.c4_train, num_samples=count, seq_len=length, batch_size=batch, seed=seed)
