"""Instruction data: the record formats (trl's included), rows dropped for empty targets, and the errors a
PruningTrainer raises before it loads a model."""

from __future__ import annotations

import logging

import datasets
import pytest
from transformers import TrainingArguments

from hfprune import PruningTrainer
from hfprune.data import detect_format, prepare_dataset, tokenize_record

from .tiny_models import alpaca_records, save_tiny, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _ids(tokenizer, text, special=True):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _text(tokenizer, ids):
    """The characters of `ids` (the tiny tokenizer is one token a character; decode() would space them)."""
    return "".join(tokenizer.convert_ids_to_tokens([i for i in ids if i != -100]))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if PruningTrainer loads a model: the error must come before."""
    import hfprune.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(hfprune.trainer, "load_model", refuse)


def _args(tmp_path, **overrides):
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True, **overrides)


# ---- formats ------------------------------------------------------------------------------------------------


def test_trl_formats_are_recognised_by_their_fields():
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["messages"]) == "chat"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    with pytest.raises(ValueError, match=r"prompt_completion: \['prompt', 'completion'\]"):
        detect_format(["question", "answer"])


def test_prompt_completion_strings_train_on_the_completion_and_end_with_eos():
    tokenizer = tiny_tokenizer()
    record = {"prompt": "Say hi: ", "completion": "hi there"}
    row = tokenize_record(record, tokenizer, "prompt_completion", max_length=64)
    prompt = _ids(tokenizer, "Say hi: ")
    assert row["input_ids"] == _ids(tokenizer, "Say hi: hi there") + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt) + row["input_ids"][len(prompt):]
    assert _text(tokenizer, row["labels"]) == "hi there</s>"
    every = tokenize_record(record, tokenizer, "prompt_completion", max_length=64, train_on_prompt=True)
    assert every["labels"] == every["input_ids"]


def test_conversational_prompt_completion_is_the_chat_format_of_the_whole_conversation():
    tokenizer = _chat_tokenizer()
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour of the sky?"}]
    completion = [{"role": "assistant", "content": "blue"}]
    row = tokenize_record({"prompt": prompt, "completion": completion}, tokenizer, "prompt_completion", 128)
    chat = tokenize_record({"messages": prompt + completion}, tokenizer, "chat", 128)
    assert row == chat
    assert _text(tokenizer, row["labels"]) == "blue\n"  # what follows the generation prompt '<assistant>'
    assert _text(tokenizer, row["input_ids"]).startswith("<system>Be brief.\n<user>Colour of the sky?\n<assistant>")


def test_mixed_prompt_and_completion_types_are_named():
    with pytest.raises(ValueError, match="a list prompt and a str completion: both must be strings, or both lists"):
        tokenize_record({"prompt": [{"role": "user", "content": "x"}], "completion": "y"}, _chat_tokenizer(),
                        "prompt_completion", 64)


def test_every_format_goes_through_prepare_dataset():
    tokenizer = _chat_tokenizer()
    sets = {
        "prompt_completion": [{"prompt": "Q: red? A: ", "completion": "yes"}] * 3,
        "chat": [{"messages": [{"role": "user", "content": "red?"}, {"role": "assistant", "content": "yes"}]}] * 3,
        "conversational prompt_completion": [{"prompt": [{"role": "user", "content": "red?"}],
                                              "completion": [{"role": "assistant", "content": "yes"}]}] * 3,
    }
    for name, records in sets.items():
        prepared = prepare_dataset(datasets.Dataset.from_list(records), tokenizer, max_length=64)
        assert len(prepared) == 3, name
        assert set(prepared.column_names) == {"input_ids", "attention_mask", "labels"}, name
        assert all(any(label != -100 for label in row) for row in prepared["labels"]), name


# ---- dropped rows and empty data sets -----------------------------------------------------------------------


def test_rows_dropped_for_empty_targets_are_counted_in_the_log(caplog):
    records = alpaca_records(10)
    for record in records[:3]:
        record["output"] = ""
    # An empty output leaves the EOS token to learn: only a prompt that fills max_length leaves nothing.
    long_prompt = {"instruction": "x" * 400, "input": "", "output": "fine"}
    with caplog.at_level(logging.WARNING, logger="hfprune.data"):
        prepared = prepare_dataset(datasets.Dataset.from_list(records + [long_prompt]), tiny_tokenizer(),
                                   max_length=300, what="train_dataset")
    assert len(prepared) == 10
    assert ("train_dataset: 1 of 11 alpaca records dropped: no response token left to train on within "
            "max_length=300") in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfprune.data"):
        assert len(prepare_dataset(datasets.Dataset.from_list(records), tiny_tokenizer(), max_length=512)) == 10
    assert "dropped" not in caplog.text  # nothing dropped, nothing said


def test_a_data_set_with_nothing_to_train_on_is_refused_before_the_model_load(tmp_path, no_model_load):
    save_tiny("llama", tmp_path / "base")
    records = [{"instruction": "Describe " + "very " * 40 + "much.", "input": "", "output": "ok"}] * 4
    with pytest.raises(ValueError, match=r"train_dataset: none of its 4 alpaca records has a response token left "
                                         r"to train on within max_length=64 .*raise max_length, pass train_on_prompt=True"):
        PruningTrainer(model=str(tmp_path / "base"), args=_args(tmp_path), max_length=64,
                       train_dataset=datasets.Dataset.from_list(records))


def test_a_hub_id_model_loads_after_its_data_is_tokenised(tmp_path, monkeypatch):
    """The tokenizer comes from the model id first; the model is loaded only once the data passed."""
    import hfprune.trainer

    save_tiny("llama", tmp_path / "base")
    order = []
    real_prepare, real_load = hfprune.trainer.prepare_dataset, hfprune.trainer.load_model
    monkeypatch.setattr(hfprune.trainer, "prepare_dataset",
                        lambda *a, **k: order.append("data") or real_prepare(*a, **k))
    monkeypatch.setattr(hfprune.trainer, "load_model", lambda *a, **k: order.append("model") or real_load(*a, **k))
    trainer = PruningTrainer(model=str(tmp_path / "base"), args=_args(tmp_path), load_in_8bit=False,
                             train_dataset=datasets.Dataset.from_list(alpaca_records(4)))
    assert order == ["data", "model"]
    assert len(trainer.train_dataset) == 4 and trainer.processing_class is not None


# ---- arguments ----------------------------------------------------------------------------------------------


def test_trl_max_seq_length_is_named_before_any_load(tmp_path, no_model_load):
    save_tiny("llama", tmp_path / "base")
    with pytest.raises(TypeError, match=r"max_seq_length=: it is called max_length= here \(PruningTrainer\(\.\.\., "
                                        r"max_length=256\)\)"):
        PruningTrainer(model=str(tmp_path / "base"), args=_args(tmp_path), max_seq_length=256,
                       train_dataset=datasets.Dataset.from_list(alpaca_records(4)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_on_prompts'; did you mean train_on_prompt="):
        PruningTrainer(model=str(tmp_path / "base"), args=_args(tmp_path), train_on_prompts=True)


def test_ddp_does_not_search_for_unused_parameters_unless_asked(tmp_path):
    from .tiny_models import tiny_model

    trainer = PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path), processing_class=tiny_tokenizer(),
                             train_dataset=datasets.Dataset.from_list(alpaca_records(4)))
    assert trainer.args.ddp_find_unused_parameters is False
    asked = PruningTrainer(model=tiny_model("llama"), args=_args(tmp_path, ddp_find_unused_parameters=True),
                           processing_class=tiny_tokenizer(),
                           train_dataset=datasets.Dataset.from_list(alpaca_records(4)))
    assert asked.args.ddp_find_unused_parameters is True
