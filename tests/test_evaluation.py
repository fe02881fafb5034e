"""Tests for hfprune.evaluation on a tiny random Llama and an in-memory word tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hfprune.evaluation import (
    DecoderWidths,
    EvaluationReport,
    LayerWidths,
    ModelEvaluation,
    SpeedComparison,
    compare_speed,
    decoder_widths,
    flops_breakdown,
    flops_per_token,
    flops_speedup_limit,
    load_texts,
    measure_speed,
    perplexity,
    run_eval,
    zero_shot,
)
from hfprune.evaluation.flops import mean_attended_keys
from hfprune.evaluation.zero_shot import _check_tasks

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK_NAME = "hfprune_tiny_mc"

WORDS = (
    "the quick brown fox jumps over a lazy dog while small birds sing in tall green trees "
    "and rivers run down to the sea under a bright blue sky"
).split()


def _doc(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS)]
    for line in (TASK_DIR / f"{TASK_NAME}.jsonl").read_text().splitlines():
        record = json.loads(line)
        corpus += [record["question"], "Question: Answer:"] + record["choices"]
    # WordLevel + whitespace split: one token per word, no special tokens added,
    # so token counts of the test texts are known exactly.
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=3, pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(len(tokenizer))


# ---------------------------------------------------------------- perplexity

# 3 documents of 55 words: 165 tokens = 10 windows of 16 + a tail of 5.
TEXTS = [_doc(55, 0), _doc(55, 7), _doc(55, 13)]


def _hand_nll(model, ids: torch.Tensor, windows: list[tuple[int, int]]) -> tuple[float, int]:
    """Sum of next-token NLLs window by window, in float64, one window per forward."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start, stop in windows:
            window = ids[start:stop]
            logits = model(window[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp[torch.arange(window.numel() - 1), window[1:]].sum().item()
            count += window.numel() - 1
    return total, count


def test_fixture_text_is_165_tokens(tokenizer):
    ids = tokenizer("\n\n".join(TEXTS), return_tensors="pt").input_ids[0]
    assert ids.numel() == 165
    assert tokenizer.unk_token_id not in ids.tolist()


def test_perplexity_matches_hand_computation_tail_dropped(model, tokenizer):
    ids = tokenizer("\n\n".join(TEXTS), return_tensors="pt").input_ids[0]
    nll, count = _hand_nll(model, ids, [(16 * i, 16 * (i + 1)) for i in range(10)])
    result = perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=4)
    assert (result.n_windows, result.n_tokens, result.seq_len, result.tail) == (10, 150, 16, "drop")
    assert count == 150
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # batching must not change the number
    assert perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=1).ppl == pytest.approx(result.ppl, rel=1e-5)


def test_perplexity_tail_included_as_its_own_window(model, tokenizer):
    ids = tokenizer("\n\n".join(TEXTS), return_tensors="pt").input_ids[0]
    nll, count = _hand_nll(model, ids, [(16 * i, 16 * (i + 1)) for i in range(10)] + [(160, 165)])
    result = perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=3, tail="include")
    assert (result.n_windows, result.n_tokens) == (11, 154) and count == 154
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_single_token_tail_predicts_nothing(model, tokenizer):
    texts = [_doc(161)]  # 10 windows + 1 token
    dropped = perplexity(model, tokenizer, texts, seq_len=16, tail="drop")
    included = perplexity(model, tokenizer, texts, seq_len=16, tail="include")
    assert (included.n_windows, included.n_tokens) == (10, 150)
    assert included.ppl == dropped.ppl


def test_max_windows_takes_the_first_windows(model, tokenizer):
    ids = tokenizer("\n\n".join(TEXTS), return_tensors="pt").input_ids[0]
    nll, count = _hand_nll(model, ids, [(0, 16), (16, 32), (32, 48)])
    result = perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=2, max_windows=3, tail="include")
    assert (result.n_windows, result.n_tokens) == (3, 45)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a cap above the window count changes nothing; the tail still comes last
    assert perplexity(model, tokenizer, TEXTS, seq_len=16, max_windows=50, tail="include").n_windows == 11


def test_text_longer_than_the_context_is_windowed_without_a_length_warning(model, tokenizer, caplog):
    from transformers import PreTrainedTokenizerFast

    short = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, model_max_length=16,
                                    unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")

    def warned() -> bool:
        return any("Token indices sequence length is longer" in r.getMessage() for r in caplog.records)

    assert perplexity(model, short, TEXTS, seq_len=16).n_windows == 10  # 165 tokens > 16: on purpose
    assert not warned()
    short("\n\n".join(TEXTS))  # the same text tokenized plainly does warn: the check above can fail
    assert warned()


def test_a_long_perplexity_run_says_how_long_and_how_to_make_it_quick():
    from hfprune.evaluation.perplexity import long_run_note

    # The defaults on a 2-core CPU: WikiText-2 at 2048 tokens, 141 windows, 4.5 s each.
    note = long_run_note("wikitext2", 141, 2048, 1, 4.5, 141)
    assert note.startswith("perplexity wikitext2: 141 windows of 2048 tokens (288768 tokens) at 4.5 s a window here: "
                           "about 10 min 34 s for this model.")
    assert "--max-windows 13 (max_windows=13; about 58 s)" in note and "--seq-len such as 512" in note
    assert long_run_note("wikitext2", 20, 512, 4, 2.0, 5) is None  # 10 s: nothing to say
    assert "about 2 h 30 min" in long_run_note("c4", 3000, 2048, 1, 3.0, 3000)


def test_perplexity_warns_after_its_first_window_when_the_rest_will_take_long(model, tokenizer, caplog,
                                                                             monkeypatch):
    import importlib

    module = importlib.import_module("hfprune.evaluation.perplexity")  # the package's `perplexity` is the function
    clock = iter([0.0, 90.0] + [90.0] * 100)  # the first window "took" 90 s, 10 windows follow
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    with caplog.at_level("WARNING", logger="hfprune.evaluation.perplexity"):
        result = perplexity(model, tokenizer, TEXTS, seq_len=16)
    assert result.n_windows == 10
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "hfprune.evaluation.perplexity"]
    assert "10 windows of 16 tokens (160 tokens) at 90.0 s a window here: about 15 min 0 s" in warning
    assert "--max-windows 1 " in warning

    caplog.clear()
    monkeypatch.setattr(module.time, "perf_counter", lambda: 0.0)
    with caplog.at_level("WARNING", logger="hfprune.evaluation.perplexity"):
        perplexity(model, tokenizer, TEXTS, seq_len=16)
    assert not [r for r in caplog.records if r.name == "hfprune.evaluation.perplexity"]


def test_local_txt_jsonl_json_sources(model, tokenizer, tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n" + TEXTS[2] + "\n")  # the blank line is skipped
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"text": t} for t in TEXTS]))

    assert load_texts(txt) == TEXTS
    assert load_texts(jsonl, text_field="content") == TEXTS
    assert load_texts(str(as_json)) == TEXTS
    reference = perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=4)
    for source, field in ((txt, "text"), (jsonl, "content"), (as_json, "text")):
        result = perplexity(model, tokenizer, source, seq_len=16, batch_size=4, text_field=field)
        assert result.ppl == pytest.approx(reference.ppl, rel=1e-6)
        assert result.source == str(source)


def test_hub_source_uses_the_real_load_dataset_call(monkeypatch, model, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_dict({"text": TEXTS, "sentence": TEXTS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = perplexity(model, tokenizer, "wikitext2", seq_len=16, max_windows=2)
    assert result.source == "wikitext2" and result.n_windows == 2
    assert load_texts("ptb") == TEXTS
    assert load_texts("c4") == TEXTS
    assert calls[0] == ("wikitext", "wikitext-2-raw-v1", {"split": "test"})
    assert calls[1] == ("ptb_text_only", "penn_treebank", {"split": "test"})
    assert calls[2][0] == "allenai/c4" and calls[2][2]["split"] == "validation"
    assert calls[2][2]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_bad_inputs_name_the_value_and_the_options(model, tokenizer, tmp_path):
    for seq_len in (1, 0, -5):
        with pytest.raises(ValueError, match=rf"seq_len={seq_len}.*>= 2"):
            perplexity(model, tokenizer, TEXTS, seq_len=seq_len)
    with pytest.raises(ValueError, match=r"'wikitext3'.*wikitext2, ptb, c4"):
        perplexity(model, tokenizer, "wikitext3")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt.*wikitext2"):
        perplexity(model, tokenizer, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"tail='keep'.*drop, include"):
        perplexity(model, tokenizer, TEXTS, seq_len=16, tail="keep")
    with pytest.raises(ValueError, match=r"batch_size=0"):
        perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=0)
    with pytest.raises(ValueError, match=r"max_windows=0"):
        perplexity(model, tokenizer, TEXTS, seq_len=16, max_windows=0)
    with pytest.raises(ValueError, match=r"165 tokens make no window of seq_len=200"):
        perplexity(model, tokenizer, TEXTS, seq_len=200)
    csv = tmp_path / "docs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'; valid types are \.txt, \.jsonl, \.json"):
        load_texts(csv)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"text_field='text'.*\['body'\]"):
        load_texts(jsonl)


# ---------------------------------------------------------------- speed


def test_measure_speed_structure(model):
    result = measure_speed(model, batch_size=2, prompt_len=8, new_tokens=3, repeats=3, warmup=1)
    assert (result.batch_size, result.prompt_len, result.new_tokens, result.repeats) == (2, 8, 3, 3)
    assert len(result.prefill_times_s) == 3 and len(result.decode_times_s) == 3
    assert result.prefill_latency_s > 0 and result.decode_latency_s > 0
    assert result.prefill_tokens_per_s == pytest.approx(2 * 8 / result.prefill_latency_s)
    assert result.decode_tokens_per_s == pytest.approx(2 * 3 / result.decode_latency_s)
    assert result.device == "cpu" and result.dtype == "float32"
    assert not model.training


def test_compare_speed_structure(model, tokenizer):
    other = _tiny_llama(len(tokenizer), seed=1)
    comparison = compare_speed(model, other, batch_size=1, prompt_len=8, new_tokens=2, repeats=2, warmup=0)
    assert isinstance(comparison, SpeedComparison)
    assert comparison.prefill_speedup > 0 and comparison.decode_speedup > 0
    assert comparison.prefill_speedup == pytest.approx(
        comparison.pruned.prefill_tokens_per_s / comparison.dense.prefill_tokens_per_s
    )
    mismatched = measure_speed(other, prompt_len=4, new_tokens=2, repeats=1, warmup=0)
    with pytest.raises(ValueError, match="prompt_len: dense=8 but pruned=4"):
        SpeedComparison.from_results(comparison.dense, mismatched)
    with pytest.raises(ValueError, match="repeats=0"):
        measure_speed(model, repeats=0)


# ---------------------------------------------------------------- FLOPs


def _prune_layer(layer, keep_kv: list[int], keep_channels: list[int], head_dim: int, n_rep: int):
    """Physically drop KV groups (with their query heads) and MLP channels of one layer."""
    attn, mlp = layer.self_attn, layer.mlp
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in keep_kv])
    q_heads = [g * n_rep + r for g in keep_kv for r in range(n_rep)]  # repeat_kv: q -> q // n_rep
    q_rows = torch.cat([torch.arange(q * head_dim, (q + 1) * head_dim) for q in q_heads])
    channels = torch.tensor(keep_channels)

    def rows(linear, index):
        new = torch.nn.Linear(linear.in_features, index.numel(), bias=False)
        new.weight.data = linear.weight.data[index].clone()
        return new

    def cols(linear, index):
        new = torch.nn.Linear(index.numel(), linear.out_features, bias=False)
        new.weight.data = linear.weight.data[:, index].clone()
        return new

    attn.q_proj, attn.k_proj, attn.v_proj = rows(attn.q_proj, q_rows), rows(attn.k_proj, kv_rows), rows(attn.v_proj, kv_rows)
    attn.o_proj = cols(attn.o_proj, q_rows)
    mlp.gate_proj, mlp.up_proj = rows(mlp.gate_proj, channels), rows(mlp.up_proj, channels)
    mlp.down_proj = cols(mlp.down_proj, channels)


def test_flops_of_a_physically_pruned_model_match_hand_count(tokenizer):
    dense = _tiny_llama(len(tokenizer))
    pruned = _tiny_llama(len(tokenizer))
    # layer 1: keep KV group 1 of 2 (query heads 2, 3) and 40 of 64 MLP channels
    _prune_layer(pruned.model.layers[1], keep_kv=[1], keep_channels=list(range(0, 64, 2)) + list(range(1, 17, 2)),
                 head_dim=8, n_rep=2)
    with torch.no_grad():  # the sliced model still runs (transformers reshapes with -1 heads)
        assert pruned(torch.tensor([[4, 5, 6, 7]])).logits.shape == (1, 4, len(tokenizer))

    widths = decoder_widths(pruned)
    assert widths.hidden_size == 32 and widths.vocab_size == len(tokenizer)
    assert widths.layers == (LayerWidths(4, 2, 8, 64), LayerWidths(2, 1, 8, 40))

    seq_len, h, vocab = 16, 32, len(tokenizer)
    mean_keys = (seq_len + 1) / 2  # 8.5 keys per query in a causal prefill of 16
    # dense layer: q,o 32x32, k,v 32x16, MLP 3 x 32x64
    dense_layer = (2 * 32 * 32 * 2 + 2 * 32 * 16 * 2) + 4 * 32 * mean_keys + 3 * 2 * 32 * 64
    assert dense_layer == 6144 + 1088 + 12288
    # pruned layer: 2 query heads (16 wide), 1 KV head (8 wide), 40 channels
    pruned_layer = (2 * 32 * 16 * 2 + 2 * 32 * 8 * 2) + 4 * 16 * mean_keys + 3 * 2 * 32 * 40
    assert pruned_layer == 3072 + 544 + 7680
    lm_head = 2 * h * vocab

    assert flops_per_token(decoder_widths(dense), seq_len) == 2 * dense_layer + lm_head
    assert flops_per_token(widths, seq_len) == dense_layer + pruned_layer + lm_head
    assert flops_breakdown(widths, seq_len)["attention_scores"] == 4 * 32 * mean_keys + 4 * 16 * mean_keys
    assert flops_speedup_limit(dense, pruned, seq_len) == pytest.approx(
        (2 * dense_layer + lm_head) / (dense_layer + pruned_layer + lm_head)
    )


def test_flops_limit_smollm2_sanity():
    # SmolLM2-135M: per layer q,k,v,o hold 576*1536 and the MLP 3*576*1536 weights,
    # 3,538,944 in all. Remove 20% of them in layers 3..28 as one of the 3 KV groups
    # (294,912) plus 239 of 1536 MLP channels (412,992): 707,904 = 20.0%.
    # Dense: 30*2*3,538,944 + 2*576*49152 + 30*4*576*512.5 = 304.38 MFLOPs/token at L=1024;
    # pruned: 26 layers lose 2*707,904 + 4*192*512.5 each -> 257.34 MFLOPs; limit 1.18x.
    # (The same 20% as MLP channels only gives 1.10x: attention scores stay.)
    dense_layer = LayerWidths(9, 3, 64, 1536)
    pruned_layer = LayerWidths(6, 2, 64, 1536 - 239)
    dense = DecoderWidths(576, 49152, (dense_layer,) * 30)
    pruned = DecoderWidths(576, 49152, (dense_layer,) * 3 + (pruned_layer,) * 26 + (dense_layer,))
    assert flops_per_token(dense, 1024) == pytest.approx(304.3e6, rel=1e-3)
    assert 1.12 < flops_speedup_limit(dense, pruned, 1024) < 1.20


def test_mean_attended_keys():
    assert mean_attended_keys(4) == 2.5  # 1, 2, 3, 4
    assert mean_attended_keys(4, window=2) == 1.75  # 1, 2, 2, 2
    assert mean_attended_keys(4, window=8) == 2.5
    with pytest.raises(ValueError, match="seq_len=0"):
        mean_attended_keys(0)


def test_decoder_widths_rejects_non_decoder():
    with pytest.raises(ValueError, match="Sequential: no ModuleList of decoder layers"):
        decoder_widths(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------- zero-shot


def test_zero_shot_on_local_task_end_to_end(model, tokenizer, monkeypatch):
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to it

    scores = zero_shot(model, tokenizer, tasks=[TASK_NAME], batch_size=4, task_dir=TASK_DIR)
    assert set(scores) == {TASK_NAME}
    assert set(scores[TASK_NAME]) == {"acc", "acc_norm"}
    for value in scores[TASK_NAME].values():
        assert 0.0 <= value <= 1.0
        assert (value * 10) == pytest.approx(round(value * 10))  # 10 questions
    assert not model.training


def test_zero_shot_outside_a_git_repository_says_nothing_about_git_or_its_call(model, tokenizer, tmp_path,
                                                                              monkeypatch, capfd, caplog):
    import shutil
    import subprocess

    for task_file in TASK_DIR.iterdir():
        shutil.copy(task_file, tmp_path)
    git = subprocess.run(["git", "describe", "--always"], cwd=tmp_path, capture_output=True, text=True)
    if "not a git repository" not in git.stderr:
        pytest.skip(f"{tmp_path} is inside a git repository (or git is missing): git has nothing to complain about")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    with caplog.at_level("INFO"):
        scores = zero_shot(model, tokenizer, tasks=[TASK_NAME], batch_size=4, task_dir=tmp_path)
    assert set(scores[TASK_NAME]) == {"acc", "acc_norm"}
    assert "not a git repository" not in capfd.readouterr().err
    messages = [record.getMessage() for record in caplog.records]
    for noise in ("is not of type `str`", "already-initialized model", "num_fewshot of hfprune_tiny_mc from None"):
        assert not [m for m in messages if noise in m], noise
    assert any(record.name.startswith("lm_eval") for record in caplog.records)  # lm-eval's other logs still pass


def test_zero_shot_rejects_unknown_tasks_and_missing_dirs(model, tokenizer, tmp_path):
    class Manager:
        all_tasks = ["piqa", "hellaswag", TASK_NAME]

    with pytest.raises(ValueError, match=r"\['piqaa'\].*piqa, hellaswag"):
        _check_tasks(["piqa", "piqaa"], Manager())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        zero_shot(model, tokenizer, tasks=[TASK_NAME], task_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"tasks=\[\]"):
        zero_shot(model, tokenizer, tasks=[])


# ---------------------------------------------------------------- report and runner


def _evaluation(name: str, params: int, ppl: float, acc: float, tokens_per_s: float, flops: float) -> ModelEvaluation:
    speed = {"batch_size": 1, "prompt_len": 8, "new_tokens": 2, "repeats": 3, "device": "cpu", "dtype": "float32",
             "prefill_tokens_per_s": tokens_per_s, "decode_tokens_per_s": tokens_per_s / 10}
    return ModelEvaluation(
        name=name, params=params, perplexity={"wikitext2": ppl},
        zero_shot={"boolq": {"acc": acc}, "piqa": {"acc": acc, "acc_norm": acc + 0.01}},
        speed=speed, flops_per_token=flops,
    )


def test_report_json_round_trip_and_markdown(tmp_path):
    report = EvaluationReport(
        dense=_evaluation("dense", 134_515_008, 12.5, 0.70, 1000.0, 3.0e8),
        pruned=_evaluation("pruned", 110_000_000, 17.25, 0.65, 1200.0, 2.5e8),
        prefill_speedup=1.2, decode_speedup=1.2, flops_speedup_limit=1.2, settings={"seq_len": 1024},
    )
    path = report.save(tmp_path / "out" / "eval.json")
    assert EvaluationReport.load(path) == report
    assert json.loads(path.read_text())["pruned"]["perplexity"] == {"wikitext2": 17.25}
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json", "eval.md"]  # no temp files left

    table = report.to_markdown()
    assert (tmp_path / "out" / "eval.md").read_text() == table
    lines = table.splitlines()
    assert lines[0] == "| metric | dense | pruned | pruned vs dense |"
    assert "| parameters | 134.52M | 110.00M | 0.82x |" in lines
    assert "| perplexity wikitext2 (seq 1024) | 12.50 | 17.25 | 1.38x |" in lines
    assert "| piqa acc_norm | 71.00 | 66.00 | -5.00 |" in lines
    assert "| mean acc | 70.00 | 65.00 | -5.00 |" in lines
    assert "| prefill tokens/s | 1000.0 | 1200.0 | 1.20x |" in lines
    assert "| FLOPs speed-up limit |  |  | 1.20x |" in lines
    assert not any("boolq acc_norm" in line for line in lines)

    assert "Accuracies in %; their change in percentage points." in table
    alone = EvaluationReport(pruned=report.pruned).to_markdown()
    assert alone.splitlines()[0] == "| metric | pruned |"
    assert "Accuracies in %." in alone and "percentage points" not in alone  # no change column, no word of it


def test_report_shows_the_zero_shot_dev_suites(tmp_path):
    def scores(acc: float) -> dict:
        return {"piqa": {"acc": acc, "acc_norm": acc + 0.02, "n": 838}, "winogrande": {"acc": 0.5, "n": 267},
                "average": {"acc": (acc + 0.5) / 2, "acc_norm": (acc + 0.52) / 2, "n": 1105}}

    report = EvaluationReport(
        dense=ModelEvaluation(name="dense", params=100, zero_shot_dev=scores(0.66)),
        pruned=ModelEvaluation(name="pruned", params=80, zero_shot_dev=scores(0.62)),
    )
    assert EvaluationReport.load(report.save(tmp_path / "eval.json")) == report
    lines = report.to_markdown().splitlines()
    assert "| piqa acc_norm (dev) | 68.00 | 64.00 | -4.00 |" in lines
    assert "| average acc (dev) | 58.00 | 56.00 | -2.00 |" in lines
    assert not any("winogrande acc_norm" in line or "mean acc" in line for line in lines)
    assert "zeroshot_dev slices (piqa 838, winogrande 267 rows)" in lines[-1]
    # a report written before this field existed still loads
    old = json.loads((tmp_path / "eval.json").read_text())
    for role in ("dense", "pruned"):
        del old[role]["zero_shot_dev"]
    assert EvaluationReport.from_dict(old).pruned.zero_shot_dev == {}


def test_run_eval_end_to_end(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")

    report = run_eval(
        tmp_path / "model", sources=[str(corpus)], seq_len=16, tasks=[],
        speed={"prompt_len": 8, "new_tokens": 2, "repeats": 2, "warmup": 0},
        baseline=tmp_path / "model", output=tmp_path / "report.json", device="cpu", progress=False,
    )
    expected = perplexity(model, tokenizer, TEXTS, seq_len=16).ppl
    assert report.pruned.perplexity[str(corpus)] == pytest.approx(expected, rel=1e-5)
    assert report.dense.perplexity[str(corpus)] == pytest.approx(expected, rel=1e-5)
    assert report.flops_speedup_limit == pytest.approx(1.0)
    assert report.prefill_speedup > 0 and report.decode_speedup > 0
    assert report.pruned.params == sum(p.numel() for p in model.parameters())
    assert EvaluationReport.load(tmp_path / "report.json") == report
    assert (tmp_path / "report.md").exists()
