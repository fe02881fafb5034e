"""hfprune's own multiple-choice scorer against lm-evaluation-harness itself, on the zeroshot_dev slices.

lm-eval runs its own task definitions (its installed piqa / arc_easy / winogrande / hellaswag YAMLs,
included as they are) with only the data source pointed at the local JSONL files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hfprune.evaluation.multiple_choice import (
    AVERAGE,
    TASKS,
    ZERO_SHOT_DEV_TASKS,
    Question,
    accuracy,
    evaluate_zero_shot,
    load_questions,
    load_suites,
    score_questions,
)
from hfprune.evaluation.multiple_choice import _group
from tests.tiny_models import tiny_model, tiny_tokenizer

LM_EVAL_ROWS = 20  # rows per task compared with lm-eval's log-likelihoods


@pytest.fixture(scope="module")
def dev_dir(data_dir) -> Path:
    path = data_dir / "zeroshot_dev"
    if not all((path / task.filename).is_file() for task in TASKS.values()):
        pytest.skip(f"zeroshot_dev slices not found in {path}")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


# ---------------------------------------------------------------- lm-eval's own tasks on the local files

# task -> (lm-eval YAML under lm_eval/tasks, split the YAML evaluates, extra keys)
LM_EVAL_SOURCES = {
    "piqa": ("piqa/piqa.yaml", "validation", ""),
    "arc_easy": ("arc/arc_easy.yaml", "test", "validation_split: null\ntag: []\n"),
    "winogrande": ("winogrande/default.yaml", "validation", ""),
    # lm-eval's process_docs builds the query from the raw fields; the slice holds it already, so
    # only lm-eval's own clean-up is applied (as process_docs does to query and endings).
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "process_docs: !function dev_docs.hellaswag\ntag: []\n"),
}
DEV_DOCS = """\
from lm_eval.tasks.hellaswag.utils import preprocess


def hellaswag(dataset):
    return dataset.map(lambda doc: {
        "query": preprocess(doc["ctx"]),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    })
"""


@pytest.fixture(scope="module")
def lm_eval_manager(tmp_path_factory, dev_dir):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    installed = Path(lm_eval.tasks.__file__).parent
    task_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (yaml, split, extra) in LM_EVAL_SOURCES.items():
        (task_dir / f"{name}_dev.yaml").write_text(
            f"include: {installed / yaml}\ntask: {name}_dev\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {dev_dir / TASKS[name].filename}\n"
            f"training_split: null\n{extra}"
        )
    (task_dir / "dev_docs.py").write_text(DEV_DOCS)
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def lm_eval_tasks(lm_eval_manager):
    from lm_eval.tasks import get_task_dict

    return get_task_dict([f"{name}_dev" for name in TASKS], lm_eval_manager)


def _lm_eval_requests(task) -> dict[int, list[tuple[str, str]]]:
    task.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append((instance.idx, tuple(instance.arguments)))
    return {doc: [args for _, args in sorted(pairs)] for doc, pairs in by_doc.items()}


@pytest.mark.slow  # ~20 s: lm-eval builds the requests of all 3481 rows
def test_every_row_becomes_lm_evals_prompt_gold_and_tokens(lm_eval_tasks, dev_dir, smollm2_tokenizer):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny_model("llama", vocab_size=len(smollm2_tokenizer)), tokenizer=smollm2_tokenizer)
    for name in TASKS:
        task = lm_eval_tasks[f"{name}_dev"]
        requests = _lm_eval_requests(task)
        questions = load_questions(name, dev_dir)
        docs = list(task.eval_docs)
        assert len(questions) == len(docs) == len(requests)
        for doc_id, (doc, question) in enumerate(zip(docs, questions)):
            assert list(zip(question.contexts, question.continuations)) == requests[doc_id], (name, doc_id)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert question.gold == gold, (name, doc_id)
            if question.norm_lengths is not None:  # lm-eval's acc_norm divisor: len() of each choice
                assert list(question.norm_lengths) == [len(c) for c in task.doc_to_choice(doc)], (name, doc_id)
            group = _group(smollm2_tokenizer, question, max_length=10**9)  # lm-eval truncates later
            for (context, continuation), tokens, n in zip(requests[doc_id], group.tokens, group.n_scored):
                context_ids, continuation_ids = lm._encode_pair(context, continuation)
                assert (tokens, n) == (context_ids + continuation_ids, len(continuation_ids)), (name, doc_id)
        assert bool(task.multiple_input) == (name == "winogrande")  # partial scoring


def _lm_eval_scores(model, tokenizer, manager, limit: int) -> dict:
    """lm-eval's per-row log-likelihoods and its accuracies, from its own HFLM on the in-memory model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    names = [f"{name}_dev" for name in TASKS]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=True, bootstrap_iters=0,
    )
    table = {}
    for name in TASKS:
        samples = sorted(results["samples"][f"{name}_dev"], key=lambda s: s["doc_id"])
        metrics = results["results"][f"{name}_dev"]
        table[name] = {
            "lls": [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples],
            "acc": metrics["acc,none"],
            "acc_norm": metrics.get("acc_norm,none"),
        }
    return table


def _assert_matches_lm_eval(model, tokenizer, manager, dev_dir, limit: int) -> dict:
    reference = _lm_eval_scores(model, tokenizer, manager, limit)
    ours = {}
    for name in TASKS:
        questions = load_questions(name, dev_dir, limit=limit)
        scores = score_questions(model, tokenizer, questions)
        assert len(scores) == len(reference[name]["lls"]) == limit
        for row, (mine, theirs) in enumerate(zip(scores, reference[name]["lls"])):
            # float32 sums: 1e-4, or 1e-6 relative for the random model's sums of -1000 and more
            assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-4), (name, row)
        ours[name] = accuracy(questions, scores)
        assert ours[name]["acc"] == reference[name]["acc"], name
        assert ours[name].get("acc_norm") == reference[name]["acc_norm"], name  # winogrande: None in both
    return ours


def test_loglikelihoods_and_accuracies_equal_lm_evals_on_a_tiny_llama(lm_eval_manager, dev_dir, smollm2_tokenizer):
    # max_position_embeddings=128: the longest HellaSwag rows are cut from the left, as lm-eval does
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    _assert_matches_lm_eval(model, smollm2_tokenizer, lm_eval_manager, dev_dir, LM_EVAL_ROWS)


@pytest.mark.slow
def test_smollm2_loglikelihoods_and_accuracies_equal_lm_evals(lm_eval_manager, dev_dir, smollm2_path,
                                                               smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ours = _assert_matches_lm_eval(model, smollm2_tokenizer, lm_eval_manager, dev_dir, 12)
    assert ours["piqa"]["acc"] > 0.5  # a real model, not noise: well above chance on the easy suite


# ---------------------------------------------------------------- the scorer itself


def _reference_scores(model, tokenizer, question: Question) -> list[float]:
    """Each choice on its own, the whole sequence in one forward, no cache, float64 log-softmax."""
    from hfprune.evaluation.multiple_choice import encode_choice

    scores = []
    with torch.no_grad():
        for context, continuation in zip(question.contexts, question.continuations):
            tokens, n = encode_choice(tokenizer, context, continuation)
            logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0, -n:].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(float(logprobs.gather(1, torch.tensor(tokens[-n:])[:, None]).sum()))
    return scores


def _short_questions() -> list[Question]:
    """Short synthetic questions for the 128-token character tokenizer: one of each layout."""
    return [
        Question(("Question: is ice cold?\nAnswer:",) * 2, (" yes", " no, it is hot"), 0, (3, 13)),
        Question(("Sky: ",) * 3, (" blue", " green!", " red"), 0, (4, 6, 3)),
        Question(("The cat sat on the mat", "The dog sat on the mat"), (" and purred.",) * 2, 0, None),
        Question(("A",) * 2, (" b", " c d e f g h"), 1, (1, 11)),
    ]


def _long_questions() -> list[Question]:
    """Prefixes of different lengths, sequences past the tiny models' 64-token sliding window."""
    return [
        Question((pad * "x" + " Which?\nAnswer:",) * 3, (" yes it is" * repeat, " no", " maybe so"), 0, (1, 1, 1))
        for pad, repeat in ((10, 1), (40, 3), (70, 2), (5, 8))
    ]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2"])
def test_scores_equal_one_sequence_at_a_time(name):
    # mistral and gemma2 have a 64-token sliding window (gemma2 also soft-caps its logits)
    model, tokenizer = tiny_model(name), tiny_tokenizer()
    questions = _short_questions() + _long_questions()
    expected = [_reference_scores(model, tokenizer, question) for question in questions]
    for batch_tokens in (16, 64, 100_000):
        scores = score_questions(model, tokenizer, questions, batch_tokens=batch_tokens)
        for mine, reference in zip(scores, expected):
            assert mine == pytest.approx(reference, abs=1e-4), batch_tokens


@pytest.mark.usefixtures("one_thread")
def test_batch_of_one_and_one_big_batch_score_the_same(dev_dir, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=512)
    for name in TASKS:
        questions = load_questions(name, dev_dir, limit=12)
        alone = score_questions(model, smollm2_tokenizer, questions, batch_tokens=1)  # every choice its own pass
        together = score_questions(model, smollm2_tokenizer, questions, batch_tokens=1_000_000)  # one pass each
        for one, big in zip(alone, together):
            assert one == pytest.approx(big, abs=1e-4), name
        assert accuracy(questions, alone) == accuracy(questions, together)


@pytest.mark.usefixtures("one_thread")
def test_physically_pruned_heterogeneous_model_and_model_without_logits_to_keep():
    from hfprune import PruningConfig, prune_model

    config = PruningConfig(target_sparsity=0.4, head_sparsity=0.5, importance="magnitude", protected_layers=(0,),
                           head_granularity="kv_group")
    model = prune_model(tiny_model("llama"), config)
    kv_heads = [layer.self_attn.k_proj.out_features for layer in model.model.layers]
    assert len(set(kv_heads)) > 1  # layers of different widths share one KV cache

    class PlainForward(torch.nn.Module):
        """A causal LM whose forward knows nothing of logits_to_keep."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache)

    tokenizer = tiny_tokenizer()
    questions = _short_questions()
    for scored_model in (model, PlainForward(model)):
        scores = score_questions(scored_model, tokenizer, questions, batch_tokens=48)
        for question, mine in zip(questions, scores):
            assert mine == pytest.approx(_reference_scores(model, tokenizer, question), abs=1e-4)


def test_shared_prefix_stops_before_the_first_scored_token():
    tokenizer = tiny_tokenizer()
    # character tokens; the context's trailing space moves to the continuation ("Sky:" + "  blue", as
    # lm-eval does), and the prefix keeps the last context token out: it predicts the first scored one
    group = _group(tokenizer, _short_questions()[1], max_length=128)
    assert group.prefix_len == len("Sky:") - 1
    assert group.n_scored == [len("  blue"), len("  green!"), len("  red")]
    # partial scoring: the options differ right after the shared "The "
    group = _group(tokenizer, _short_questions()[2], max_length=128)
    assert group.prefix_len == len("The ")
    assert group.n_scored == [len(" and purred.")] * 2


def test_acc_norm_divides_by_characters_and_ties_go_to_the_first_choice():
    question = TASKS["piqa"].to_question({"goal": "g", "sol1": "éééé", "sol2": "eeeee", "label": 0})
    assert question.norm_lengths == (4, 5)  # characters; in UTF-8 bytes they would be (8, 5)
    # acc picks -5 > -6; per character -5/4 < -6/5 picks choice 1 (per byte -5/8 would pick choice 0)
    assert accuracy([question], [[-5.0, -6.0]]) == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    assert accuracy([question], [[-2.0, -2.0]])["acc"] == 1.0  # a tie goes to choice 0, as numpy's argmax
    partial = Question(("a", "b"), (" c", " c"), 1, None)
    assert accuracy([partial], [[-1.0, -0.5]]) == {"acc": 1.0, "n": 1}
    with pytest.raises(ValueError, match="1 questions but 2 score lists"):
        accuracy([partial], [[-1.0, -0.5], [0.0, 0.0]])


@pytest.mark.usefixtures("one_thread")
def test_evaluate_zero_shot_reports_every_task_and_the_average(dev_dir, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer)).train()
    results = evaluate_zero_shot(model, smollm2_tokenizer, dev_dir, limit=6)
    assert list(results) == [*ZERO_SHOT_DEV_TASKS, AVERAGE]
    for name in ZERO_SHOT_DEV_TASKS:
        assert results[name]["n"] == 6
        assert set(results[name]) == ({"acc", "n"} if name == "winogrande" else {"acc", "acc_norm", "n"})
        assert 6 * results[name]["acc"] == pytest.approx(round(6 * results[name]["acc"]))
    tasks = [results[name] for name in ZERO_SHOT_DEV_TASKS]
    assert results[AVERAGE]["acc"] == pytest.approx(sum(t["acc"] for t in tasks) / 4)
    assert results[AVERAGE]["acc_norm"] == pytest.approx(sum(t.get("acc_norm", t["acc"]) for t in tasks) / 4)
    assert results[AVERAGE]["n"] == 24
    assert model.training  # the mode is restored
    one = evaluate_zero_shot(model, smollm2_tokenizer, dev_dir, tasks=["winogrande"], limit=6)
    assert one["winogrande"] == results["winogrande"] and one[AVERAGE]["acc"] == results["winogrande"]["acc"]


# ---------------------------------------------------------------- bad input


class _NoModel:
    """Fails the test if anything touches it: bad input must be refused before the model runs."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the input was checked")


def _write(directory: Path, name: str, rows) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TASKS[name].filename
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


PIQA_ROW = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        ("piqa", ["{not json"], r"piqa.jsonl:1: not a JSON object .*goal \(str\), sol1 \(str\)"),
        ("piqa", ["[1, 2]"], r"piqa.jsonl:1: a list, not a JSON object"),
        ("piqa", [PIQA_ROW, {**PIQA_ROW, "label": "0"}], r"piqa.jsonl:2: field 'label' is a str; .*label \(int\)"),
        ("piqa", [PIQA_ROW, {**PIQA_ROW, "label": True}], r"piqa.jsonl:2: field 'label' is a bool"),
        ("piqa", [{"goal": "g", "sol1": "a", "label": 0}], r"piqa.jsonl:1: field 'sol2' is missing"),
        ("piqa", [{**PIQA_ROW, "label": 2}], r"piqa.jsonl:1: ill-formed piqa row: gold index 2 is not one of the 2"),
        ("arc_easy", [{"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}],
         r"arc_easy.jsonl:1: ill-formed arc_easy row: answerKey='C' is not one of the labels \['A', 'B'\]"),
        ("arc_easy", [{"question": "q", "choices": {"text": ["x"]}, "answerKey": "A"}],
         r"arc_easy.jsonl:1: ill-formed arc_easy row: 'label'"),
        ("winogrande", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}],
         r"winogrande.jsonl:1: ill-formed winogrande row: sentence has no blank"),
        ("winogrande", [{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}],
         r"answer='3': must be '1' or '2'"),
        ("hellaswag", [{"ctx": "c", "endings": "e", "label": 0}], r"field 'endings' is a str; .*endings \(list\)"),
        ("hellaswag", ["", "  "], r"hellaswag.jsonl': no rows"),
    ],
)
def test_ill_formed_files_name_the_line_and_the_expected_fields(tmp_path, name, rows, message):
    _write(tmp_path, name, rows)
    with pytest.raises(ValueError, match=message):
        evaluate_zero_shot(_NoModel(), None, tmp_path, tasks=[name])


def test_bad_arguments_are_refused_before_the_model_runs(tmp_path, dev_dir):
    with pytest.raises(ValueError, match=r"tasks=\['boolq'\]: unknown .* valid tasks are piqa, arc_easy, winogrande"):
        evaluate_zero_shot(_NoModel(), None, dev_dir, tasks=["piqa", "boolq"])
    with pytest.raises(ValueError, match=r"tasks=\[\]: name at least one of piqa"):
        evaluate_zero_shot(_NoModel(), None, dev_dir, tasks=[])
    with pytest.raises(ValueError, match="named twice"):
        evaluate_zero_shot(_NoModel(), None, dev_dir, tasks=["piqa", "piqa"])
    for limit in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"limit={limit!r}: must be None \(every row\) or an integer >= 1"):
            evaluate_zero_shot(_NoModel(), None, dev_dir, limit=limit)
    with pytest.raises(ValueError, match=r"batch_tokens=0: must be an integer >= 1"):
        evaluate_zero_shot(_NoModel(), None, dev_dir, batch_tokens=0)
    with pytest.raises(FileNotFoundError, match=r"data_dir='.*nowhere': not a directory; it must hold piqa.jsonl"):
        evaluate_zero_shot(_NoModel(), None, tmp_path / "nowhere")
    _write(tmp_path, "piqa", [PIQA_ROW])
    with pytest.raises(FileNotFoundError, match=r"arc_easy.jsonl': no such file; the arc_easy task reads arc_easy.jsonl"):
        evaluate_zero_shot(_NoModel(), None, tmp_path)  # piqa is fine, the others missing: nothing ran
    assert len(load_suites(tmp_path, ["piqa"])["piqa"]) == 1


def test_continuations_that_cannot_be_scored_are_errors():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="continuation '' after 'Q:' encodes to no token"):
        score_questions(model, tokenizer, [Question(("Q:",) * 2, ("", " b"), 0, (0, 1))])
    with pytest.raises(ValueError, match="empty context before continuation ' b'"):
        score_questions(model, tokenizer, [Question(("", "a"), (" b", " b"), 0, None)])
    with pytest.raises(ValueError, match=r"\.\.\.: 200 tokens, more than the model's context of 128"):
        score_questions(model, tokenizer, [Question(("Q:",) * 2, (" a", " " + "b" * 199), 0, (1, 199))])


def test_hellaswag_clean_up_matches_lm_evals_on_markup():
    lm_eval_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    from hfprune.evaluation.multiple_choice import _hellaswag_clean

    for text in (" How to x [title] Do y. [step] A [style a | b] can  z.   ", "plain text", "a  [x]  b"):
        assert _hellaswag_clean(text) == lm_eval_utils.preprocess(text)
