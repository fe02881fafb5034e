"""Zero-shot multiple-choice accuracy by log-likelihood, scored by our own code.

Each question is scored exactly as lm-evaluation-harness 0.4.13 scores it (same prompt,
target delimiter, tokenisation of the context/continuation pair, ``acc`` and ``acc_norm``),
so the numbers are lm-eval's; ``tests/test_multiple_choice.py`` checks it row by row against
lm-eval itself. What differs is only how the forward passes are spent:

* the choices of a question share their context: the shared token prefix is run once and its
  KV cache serves every choice (lm-eval runs the context once per choice);
* logits are computed only where a continuation token is scored (``logits_to_keep``), so the
  vocabulary projection and the log-softmax skip the context;
* several questions go through one forward, batches sized by padded tokens.

The suites are the local slices of ``zeroshot_dev/`` (PIQA, ARC-Easy, WinoGrande,
HellaSwag; one JSON object a line, formats in :data:`TASKS`).

Definitions, as lm-eval's task YAMLs have them:

* ``acc``: the choice whose continuation has the highest summed log-probability is the gold one;
* ``acc_norm``: the same after dividing each log-likelihood by the length of the choice text in
  characters (``len(choice)``, the target delimiter excluded: lm-eval 0.4.13's ``acc_norm``;
  its byte-length variant is the separate ``acc_bytes``);
* WinoGrande uses partial scoring: each option completes the sentence up to the blank (the
  context) and the rest of the sentence (the same for both) is scored. lm-eval defines no
  ``acc_norm`` for it, and neither do we; the ``acc_norm`` average counts its ``acc``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# lm-eval's default `target_delimiter`; none of the four tasks overrides it.
TARGET_DELIMITER = " "
# Padded tokens per forward pass (prefix and continuation passes each): on one CPU thread
# SmolLM2 runs fastest at 256-512; a GPU wants several thousand.
DEFAULT_BATCH_TOKENS = 512
AVERAGE = "average"
# lm-eval reads the context length from these config attributes, then the tokenizer, then 2048.
_LENGTH_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")
_DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Question:
    """One row, ready to score: choice ``i`` is ``continuations[i]`` after ``contexts[i]``.

    ``norm_lengths`` holds the ``acc_norm`` divisor of each choice, or None when the task has
    no ``acc_norm``.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...] | None


@dataclass(frozen=True)
class MultipleChoiceTask:
    """How a row of ``filename`` becomes a :class:`Question`.

    ``fields`` maps each required field to its JSON type(s); rows are checked against it
    (and by ``to_question``) before any model runs.
    """

    name: str
    filename: str
    fields: dict[str, type | tuple[type, ...]]
    to_question: Callable[[dict], Question]

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc",) if self.name in _PARTIAL_SCORING else ("acc", "acc_norm")


# ---------------------------------------------------------------- the four suites


def _choices_after(context: str, choices: Sequence[str], gold: int) -> Question:
    """The usual layout: one context, each choice scored after it."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is not one of the {len(choices)} choices")
    return Question(
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + choice for choice in choices),
        gold=gold,
        norm_lengths=tuple(len(choice) for choice in choices),
    )


def _piqa(row: dict) -> Question:
    # lm_eval/tasks/piqa/piqa.yaml
    return _choices_after(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _arc(row: dict) -> Question:
    # lm_eval/tasks/arc/arc_easy.yaml: the gold is the position of answerKey among the labels
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if len(labels) != len(texts):
        raise ValueError(f"choices has {len(texts)} texts but {len(labels)} labels")
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey={row['answerKey']!r} is not one of the labels {labels}")
    return _choices_after(f"Question: {row['question']}\nAnswer:", texts, labels.index(row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up (lm_eval/tasks/hellaswag/utils.py): WikiHow markup out.

    The slice is already pre-processed, but a few bracketed spans remain that lm-eval's
    pipeline would have removed; on clean text this changes nothing.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    # lm_eval/tasks/hellaswag/hellaswag.yaml: query and endings cleaned, gold = label
    endings = [_hellaswag_clean(ending) for ending in row["endings"]]
    return _choices_after(_hellaswag_clean(row["ctx"]), endings, row["label"])


def _winogrande(row: dict) -> Question:
    # lm_eval/tasks/winogrande/preprocess_winogrande.py: each option fills the blank and ends the
    # context; what follows the blank is the continuation, the same for every option.
    sentence = row["sentence"]
    blank = sentence.find("_")
    if blank < 0:
        raise ValueError(f"sentence has no blank '_': {sentence!r}")
    if row["answer"] not in ("1", "2"):
        raise ValueError(f"answer={row['answer']!r}: must be '1' or '2'")
    rest = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    return Question(
        contexts=(sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]),
        continuations=(rest, rest),
        gold=int(row["answer"]) - 1,
        norm_lengths=None,
    )


_PARTIAL_SCORING = ("winogrande",)

TASKS: dict[str, MultipleChoiceTask] = {
    task.name: task
    for task in (
        MultipleChoiceTask("piqa", "piqa.jsonl", {"goal": str, "sol1": str, "sol2": str, "label": int}, _piqa),
        MultipleChoiceTask("arc_easy", "arc_easy.jsonl", {"question": str, "choices": dict, "answerKey": str}, _arc),
        MultipleChoiceTask(
            "winogrande", "winogrande.jsonl",
            {"sentence": str, "option1": str, "option2": str, "answer": str}, _winogrande,
        ),
        MultipleChoiceTask("hellaswag", "hellaswag.jsonl", {"ctx": str, "endings": list, "label": int}, _hellaswag),
    )
}
ZERO_SHOT_DEV_TASKS = tuple(TASKS)


def get_task(task: str | MultipleChoiceTask) -> MultipleChoiceTask:
    if isinstance(task, MultipleChoiceTask):
        return task
    if task not in TASKS:
        raise ValueError(f"task={task!r}: unknown multiple-choice task; valid tasks are {', '.join(TASKS)}")
    return TASKS[task]


def load_questions(
    task: str | MultipleChoiceTask, data_dir: str | os.PathLike, limit: int | None = None
) -> list[Question]:
    """The questions of ``data_dir/<task file>``: every row is checked, the first ``limit`` kept."""
    task = get_task(task)
    _check_limit(limit)
    path = Path(data_dir) / task.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r}: no such file; the {task.name} task reads {task.filename} "
            f"from data_dir (the zeroshot_dev/ folder)"
        )
    wanted = ", ".join(f"{name} ({_type_name(kind)})" for name, kind in task.fields.items())
    questions = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not a JSON object ({err.msg}); a {task.name} row has {wanted}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a {type(row).__name__}, not a JSON object; a {task.name} row has {wanted}")
            for name, kind in task.fields.items():
                # bool is an int to Python, never a valid label here
                if name not in row or not isinstance(row[name], kind) or isinstance(row[name], bool):
                    found = "missing" if name not in row else f"a {type(row[name]).__name__}"
                    raise ValueError(f"{where}: field {name!r} is {found}; a {task.name} row has {wanted}")
            try:
                questions.append(task.to_question(row))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: ill-formed {task.name} row: {err}") from None
    if not questions:
        raise ValueError(f"{str(path)!r}: no rows; a {task.name} row has {wanted}")
    return questions if limit is None else questions[:limit]


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _check_limit(limit) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit={limit!r}: must be None (every row) or an integer >= 1")


# ---------------------------------------------------------------- tokenisation, as lm-eval does it


def encode_choice(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """``(tokens, n_scored)``: the model input of one choice and how many of its last tokens are scored.

    lm-eval's causal-LM encoding: trailing whitespace of the context moves to the continuation,
    the context is encoded alone, the whole text is encoded, and the continuation is what the
    whole encoding holds beyond the context's length.
    """
    if not context:
        raise ValueError(f"empty context before continuation {continuation!r}: every choice needs a context")
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped) :] + continuation
        context = stripped
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} after {context[-40:]!r} encodes to no token")
    return context_ids + continuation_ids, len(continuation_ids)


def model_max_length(model, tokenizer) -> int:
    """The context length lm-eval would use: config, then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in _LENGTH_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value < 10**29:  # "unset" is a huge sentinel in transformers
        return int(value)
    return _DEFAULT_MAX_LENGTH


@dataclass
class _Group:
    """The choices of one question, tokenised: ``prefix_len`` tokens are shared and run once.

    Choice ``i`` feeds ``tokens[i][prefix_len:-1]`` after the shared prefix; its last
    ``n_scored[i]`` positions predict the scored tokens.
    """

    tokens: list[list[int]]
    n_scored: list[int]
    prefix_len: int

    @property
    def suffix_lens(self) -> list[int]:
        return [len(t) - self.prefix_len - 1 for t in self.tokens]


def _group(tokenizer, question: Question, max_length: int) -> _Group:
    tokens, n_scored = [], []
    for context, continuation in zip(question.contexts, question.continuations, strict=True):
        ids, n = encode_choice(tokenizer, context, continuation)
        if n > max_length:
            raise ValueError(
                f"continuation {continuation[:40]!r}...: {n} tokens, more than the model's context of {max_length}"
            )
        tokens.append(ids[-(max_length + 1) :])  # lm-eval truncates from the left
        n_scored.append(n)
    shared = min(len(t) for t in tokens)
    for position in range(shared):
        if any(t[position] != tokens[0][position] for t in tokens[1:]):
            shared = position
            break
    # Each choice must still feed the position that predicts its first scored token.
    prefix_len = min([shared] + [len(t) - n - 1 for t, n in zip(tokens, n_scored)])
    return _Group(tokens, n_scored, prefix_len)


# ---------------------------------------------------------------- scoring


def score_questions(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[Question],
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every choice's continuation: ``[question][choice]``, in input order.

    Works for any ``transformers`` causal LM (a KV cache carries each question's shared
    prefix). The model is put in eval mode for the run and its mode restored afterwards.
    """
    _check_batch_tokens(batch_tokens)
    max_length = model_max_length(model, tokenizer)
    groups = [_group(tokenizer, question, max_length) for question in questions]
    batches = _prefix_batches(groups, batch_tokens, _sliding_window(model))
    device = model.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keeps_logits = _accepts_logits_to_keep(model)

    results: list[list[float] | None] = [None] * len(groups)
    was_training = model.training
    model.eval()
    try:
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="multiple choice", unit="batch")
        with torch.inference_mode():
            for batch in iterator:
                scores = _score_batch(model, [groups[i] for i in batch], device, pad_id, keeps_logits, batch_tokens)
                for index, score in zip(batch, scores):
                    results[index] = score
    finally:
        model.train(was_training)
    return results


def _check_batch_tokens(batch_tokens) -> None:
    if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens < 1:
        raise ValueError(f"batch_tokens={batch_tokens!r}: must be an integer >= 1 (padded tokens per forward pass)")


def _sliding_window(model) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _accepts_logits_to_keep(model) -> bool:
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        if candidate is not None and "logits_to_keep" in inspect.signature(candidate.forward).parameters:
            return True
    return False


def _prefix_batches(groups: list[_Group], batch_tokens: int, window: int | None) -> list[list[int]]:
    """Question indices per prefix pass: longest prefixes first, rows x longest prefix <= ``batch_tokens``.

    A question whose prefix alone is longer is a batch of its own.
    """
    order = sorted(range(len(groups)), key=lambda i: -groups[i].prefix_len)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        group = groups[index]
        # Rows are sorted, so the batch's first row has its longest prefix.
        longest = groups[current[0]].prefix_len if current else group.prefix_len
        fits = (len(current) + 1) * longest <= batch_tokens
        # A shorter prefix leaves masked cache slots before its continuation; a sliding window
        # counts those slots, so a windowed model batches only what stays inside its window.
        if window is not None and longest + max(group.suffix_lens) > window:
            fits = False
        if current and not fits:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _suffix_chunks(suffix_lens: list[int], batch_tokens: int) -> list[list[int]]:
    """Choice indices per continuation pass: longest first, choices x longest <= ``batch_tokens``."""
    order = sorted(range(len(suffix_lens)), key=lambda i: -suffix_lens[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * suffix_lens[current[0]] > batch_tokens:
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def _score_batch(
    model, groups: list[_Group], device, pad_id: int, keeps_logits: bool, batch_tokens: int
) -> list[list[float]]:
    """One prefix pass over the shared prefixes of ``groups``, then continuation passes over their choices.

    Choices are regrouped by continuation length so the continuation passes pad little; each
    takes its rows of the prefix cache (masked where a row's prefix is shorter than the longest).
    """
    prefix_lens = torch.tensor([g.prefix_len for g in groups])
    prefix_max = int(prefix_lens.max())
    choices = [(r, c) for r, g in enumerate(groups) for c in range(len(g.tokens))]
    cache = None
    if prefix_max > 0:
        prefix_ids = torch.full((len(groups), prefix_max), pad_id, dtype=torch.long)
        for r, group in enumerate(groups):
            prefix_ids[r, : group.prefix_len] = torch.tensor(group.tokens[0][: group.prefix_len], dtype=torch.long)
        # Right padding needs no mask here: a causal model's real positions never see later pads.
        no_logits = torch.zeros(prefix_ids.shape, dtype=torch.bool)
        cache = _forward(model, keeps_logits, no_logits, input_ids=prefix_ids.to(device), use_cache=True).past_key_values
    prefix_mask = (torch.arange(prefix_max)[None, :] < prefix_lens[:, None]).long()

    scores = [[0.0] * len(g.tokens) for g in groups]
    suffix_lens = [groups[r].suffix_lens[c] for r, c in choices]
    chunks = _suffix_chunks(suffix_lens, batch_tokens)
    for number, chunk in enumerate(chunks):
        rows = torch.tensor([choices[i][0] for i in chunk])
        chunk_cache = None
        if cache is not None:
            # The last chunk may consume the prefix cache; the others select from a copy.
            chunk_cache = cache if number == len(chunks) - 1 else copy.deepcopy(cache)
            chunk_cache.batch_select_indices(rows.to(device))
        sums = _score_suffixes(
            model, [choices[i] for i in chunk], groups, chunk_cache, prefix_mask[rows], prefix_lens[rows],
            device, pad_id, keeps_logits,
        )
        for i, total in zip(chunk, sums):
            r, c = choices[i]
            scores[r][c] = total
    return scores


def _score_suffixes(
    model, choices, groups, cache, prefix_mask, prefix_lens, device, pad_id: int, keeps_logits: bool
) -> list[float]:
    """Summed log-probabilities of the scored tokens of ``choices`` ((row, choice) pairs), after ``cache``."""
    suffixes = [groups[r].tokens[c][groups[r].prefix_len : -1] for r, c in choices]
    n_scored = [groups[r].n_scored[c] for r, c in choices]
    width = max(len(s) for s in suffixes)
    input_ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros(input_ids.shape, dtype=torch.long)
    scored = torch.zeros(input_ids.shape, dtype=torch.bool)
    targets = []
    for i, ((r, c), suffix, n) in enumerate(zip(choices, suffixes, n_scored)):
        input_ids[i, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
        suffix_mask[i, : len(suffix)] = 1
        scored[i, len(suffix) - n : len(suffix)] = True
        targets += groups[r].tokens[c][-n:]
    attention_mask = suffix_mask if cache is None else torch.cat([prefix_mask, suffix_mask], dim=1)
    position_ids = prefix_lens[:, None] + torch.arange(width)[None, :]
    out = _forward(
        model, keeps_logits, scored.to(device),
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device), past_key_values=cache, use_cache=cache is not None,
    )
    # float32 log-softmax whatever the model's dtype (lm-eval uses the model's dtype)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    token_scores = logprobs.gather(-1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0]
    return [float(s.sum()) for s in token_scores.split(n_scored)]


def _forward(model, keeps_logits: bool, keep: torch.Tensor, **inputs):
    """Run ``model``; ``out.logits`` holds only the positions where ``keep`` is True: ``[n_kept, vocab]``."""
    if keeps_logits:
        return model(**inputs, logits_to_keep=keep)
    out = model(**inputs)
    out.logits = out.logits[keep]
    return out


# ---------------------------------------------------------------- accuracy


def accuracy(questions: Sequence[Question], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, float | int]:
    """``{"acc", "acc_norm", "n"}`` over ``questions`` (``acc_norm`` only where defined)."""
    if len(questions) != len(loglikelihoods) or not questions:
        raise ValueError(f"{len(questions)} questions but {len(loglikelihoods)} score lists: need equal, non-zero counts")
    correct = correct_norm = 0
    normalised = all(q.norm_lengths is not None for q in questions)
    for question, lls in zip(questions, loglikelihoods):
        correct += _argmax(lls) == question.gold
        if normalised:
            correct_norm += _argmax([ll / length for ll, length in zip(lls, question.norm_lengths)]) == question.gold
    result: dict[str, float | int] = {"acc": correct / len(questions)}
    if normalised:
        result["acc_norm"] = correct_norm / len(questions)
    result["n"] = len(questions)
    return result


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's rule, which lm-eval uses)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def average(results: dict[str, dict]) -> dict[str, float | int]:
    """Mean ``acc`` and mean ``acc_norm`` over tasks; a task without ``acc_norm`` counts its ``acc``."""
    tasks = [metrics for name, metrics in results.items() if name != AVERAGE]
    return {
        "acc": sum(m["acc"] for m in tasks) / len(tasks),
        "acc_norm": sum(m.get("acc_norm", m["acc"]) for m in tasks) / len(tasks),
        "n": sum(m["n"] for m in tasks),
    }


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer,
    data_dir: str | os.PathLike,
    tasks: Sequence[str] = ZERO_SHOT_DEV_TASKS,
    limit: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: bool = False,
) -> dict[str, dict[str, float | int]]:
    """Accuracy on the local suites: ``{task: {"acc", "acc_norm", "n"}, ..., "average": {...}}``.

    ``limit`` keeps the first rows of each task (quick checks only: on a few hundred rows the
    noise is about +-2 points per task). Every file is read and checked before the model runs.
    """
    _check_batch_tokens(batch_tokens)
    suites = load_suites(data_dir, tasks, limit)
    results: dict[str, dict[str, float | int]] = {}
    for name, questions in suites.items():
        scores = score_questions(model, tokenizer, questions, batch_tokens=batch_tokens, progress=progress)
        results[name] = accuracy(questions, scores)
    results[AVERAGE] = average(results)
    return results


def load_suites(
    data_dir: str | os.PathLike, tasks: Sequence[str] = ZERO_SHOT_DEV_TASKS, limit: int | None = None
) -> dict[str, list[Question]]:
    """``{task: questions}``, every file of ``tasks`` in ``data_dir`` read and checked."""
    tasks = check_tasks(tasks)
    _check_limit(limit)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r}: not a directory; it must hold "
            + ", ".join(TASKS[name].filename for name in tasks)
        )
    return {name: load_questions(name, data_dir, limit) for name in tasks}


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """``tasks`` as a list of known, distinct task names, or a ValueError that names the valid ones."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"tasks=[]: name at least one of {', '.join(TASKS)}")
    unknown = [name for name in tasks if name not in TASKS]
    if unknown:
        raise ValueError(f"tasks={unknown!r}: unknown multiple-choice tasks; valid tasks are {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks={tasks!r}: a task is named twice")
    return tasks
