"""Tiny random models of every supported architecture, built in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

# name -> config kwargs. GQA with n_rep > 1 everywhere but llama_mha (n_rep == 1).
ARCHITECTURES = {
    "llama": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=64),
    "qwen2": dict(model_type="qwen2", num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    "qwen3": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=64),
    "gemma3_text": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=64),
}


def tiny_config(name: str, **overrides):
    kwargs = {**COMMON, **ARCHITECTURES[name], **overrides}
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(name: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init has tiny weights; scale up so every group matters and differences show.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.eval()


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEAD_LAYER, DEAD_GROUP, DEAD_CHANNELS = 2, 1, [5, 17, 40]


def with_lora(model, b_std: float):
    """LoRA r=4 on the seven projections, B != 0 (as after some training) drawn with std `b_std`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    return model


def model_with_dead_groups():
    """A tiny Llama whose layer DEAD_LAYER has KV group DEAD_GROUP (and its query heads) and the MLP channels
    DEAD_CHANNELS scaled down 1000x: every criterion should rank them lowest."""
    from hfprune.structure import head_rows

    model = tiny_model("llama")
    with torch.no_grad():
        attn, mlp = model.model.layers[DEAD_LAYER].self_attn, model.model.layers[DEAD_LAYER].mlp
        kv = head_rows(torch.tensor([DEAD_GROUP]), 8)
        q = head_rows(torch.arange(DEAD_GROUP * 4, DEAD_GROUP * 4 + 4), 8)
        for weight, rows in ((attn.k_proj.weight, kv), (attn.v_proj.weight, kv), (attn.q_proj.weight, q)):
            weight[rows] *= 1e-3
        attn.o_proj.weight[:, q] *= 1e-3
        channels = torch.tensor(DEAD_CHANNELS)
        mlp.gate_proj.weight[channels] *= 1e-3
        mlp.up_proj.weight[channels] *= 1e-3
        mlp.down_proj.weight[:, channels] *= 1e-3
    return model


def batch(vocab_size: int = 128, batch_size: int = 2, seq_len: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + specials) whose ids fit the tiny vocab of 128."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def alpaca_records(n: int = 32, seed: int = 0):
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]
    records = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        records.append({"instruction": f"Join {a} and {b}.", "input": "" if i % 2 else "now", "output": f"{a} {b}"})
    return records


def save_tiny(name: str, path, **overrides):
    model = tiny_model(name, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


TEXT = "the quick brown fox jumps over the lazy dog while small birds sing in tall green trees\n" * 8


def tiny_recipe(tmp_path: Path, base, *, target_sparsity: float = 0.5, with_eval: bool = False,
                **sections) -> Path:
    """A recipe for a saved tiny model (`save_tiny`): 4 optimizer steps on 32 alpaca records (`data.json`
    beside it), the export in tmp_path/model; `with_eval`: perplexity on a short text and a quick speed
    check. `sections` update the recipe's sections key by key; a section given as None is removed."""
    (tmp_path / "data.json").write_text(json.dumps(alpaca_records(32)))
    recipe = {
        "model": {"name_or_path": str(base), "load_in_8bit": False, "dtype": "float32"},
        "lora": {"r": 4, "lora_alpha": 8},
        "pruning": {"target_sparsity": target_sparsity, "prune_every": 1, "protected_layers": [0], "seed": 0},
        "data": {"train": "data.json", "max_length": 128, "train_on_prompt": True},  # relative to the recipe
        "training": {"output_dir": str(tmp_path / "trainer"), "max_steps": 4, "per_device_train_batch_size": 2,
                     "learning_rate": 2e-3, "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "seed": 0},
        "export": {"output_dir": str(tmp_path / "model")},
    }
    if with_eval:
        (tmp_path / "text.txt").write_text(TEXT)
        recipe["eval"] = {"perplexity": ["text.txt"], "seq_len": 16, "max_windows": 2,
                          "speed": {"prompt_len": 8, "new_tokens": 2, "repeats": 1, "warmup": 0}}
    for name, value in sections.items():
        if value is None:
            recipe.pop(name, None)
        else:
            recipe[name] = {**recipe.get(name, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# A tiny Llama whose every 4-bit layer bitsandbytes 0.50 computes right on the CPU: in_features a multiple of the
# block size 64 (hfprune.bnb4bit.cpu_dequantize_is_wrong), and head_dim 64 so a removed head is whole blocks of
# o_proj. Pruned MLP widths must stay multiples of 64 too: PruningConfig(round_channels_to=64).
FOUR_BIT_SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def load_4bit(path, quant_type: str = "nf4", double_quant: bool = False, compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu",
                                                dtype=torch.float32).eval()
