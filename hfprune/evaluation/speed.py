"""Prefill and decode speed of a causal LM, and speed-ups of a pruned model.

Both phases are timed separately, the way a serving stack sees them:

* prefill: one forward pass over ``batch_size`` prompts of ``prompt_len``
  tokens, building the KV cache; throughput is prompt tokens per second.
* decode: ``new_tokens`` greedy steps of one token per sequence, each reusing
  the KV cache; throughput is generated tokens per second.

Prompts are random token ids from a seeded generator, so a dense and a pruned
model see identical inputs. ``warmup`` untimed rounds come first (kernel
selection, allocator growth, lazy initialisation), then ``repeats`` timed
rounds; medians are reported because single rounds on a shared machine have
long-tailed noise.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class SpeedResult:
    """Median prefill/decode timings of one model (times in seconds)."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_latency_s: float
    prefill_tokens_per_s: float
    decode_latency_s: float  # all ``new_tokens`` steps together
    decode_tokens_per_s: float
    device: str
    dtype: str
    prefill_times_s: list[float] = field(default_factory=list)
    decode_times_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpeedComparison:
    """Speed-ups of ``pruned`` over ``dense`` (> 1 means the pruned model is faster)."""

    dense: SpeedResult
    pruned: SpeedResult
    prefill_speedup: float
    decode_speedup: float

    @classmethod
    def from_results(cls, dense: SpeedResult, pruned: SpeedResult) -> SpeedComparison:
        same = ("batch_size", "prompt_len", "new_tokens")
        for name in same:
            if getattr(dense, name) != getattr(pruned, name):
                raise ValueError(
                    f"{name}: dense={getattr(dense, name)} but pruned={getattr(pruned, name)}; "
                    f"speed-ups need the same {', '.join(same)}"
                )
        return cls(
            dense=dense,
            pruned=pruned,
            prefill_speedup=pruned.prefill_tokens_per_s / dense.prefill_tokens_per_s,
            decode_speedup=pruned.decode_tokens_per_s / dense.decode_tokens_per_s,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def random_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``[batch_size, prompt_len]`` token ids, identical for identical arguments."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator)


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before the work does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill_kwargs(model: torch.nn.Module) -> dict:
    # generate() asks for the last position's logits only; doing the same keeps
    # the LM head over the whole prompt out of the prefill time.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


@torch.inference_mode()
def _time_round(model, prompts: torch.Tensor, new_tokens: int, extra: dict) -> tuple[float, float]:
    device = prompts.device
    _synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=prompts, use_cache=True, **extra)
    next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    _synchronize(device)
    prefill = time.perf_counter() - start

    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    _synchronize(device)
    decode = time.perf_counter() - start
    return prefill, decode


def measure_speed(
    model: torch.nn.Module,
    batch_size: int = 1,
    prompt_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> SpeedResult:
    """Median prefill and decode speed of ``model`` (see the module docstring)."""
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    prompts = random_prompts(embeddings.num_embeddings, batch_size, prompt_len, seed).to(device)
    extra = _prefill_kwargs(model)

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _time_round(model, prompts, new_tokens, extra)
        rounds = [_time_round(model, prompts, new_tokens, extra) for _ in range(repeats)]
    finally:
        model.train(was_training)

    prefill_times = [r[0] for r in rounds]
    decode_times = [r[1] for r in rounds]
    prefill_latency = statistics.median(prefill_times)
    decode_latency = statistics.median(decode_times)
    return SpeedResult(
        batch_size=batch_size,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_latency_s=prefill_latency,
        prefill_tokens_per_s=batch_size * prompt_len / prefill_latency,
        decode_latency_s=decode_latency,
        decode_tokens_per_s=batch_size * new_tokens / decode_latency,
        device=str(device),
        dtype=str(embeddings.weight.dtype).removeprefix("torch."),
        prefill_times_s=prefill_times,
        decode_times_s=decode_times,
    )


def compare_speed(dense_model: torch.nn.Module, pruned_model: torch.nn.Module, **kwargs) -> SpeedComparison:
    """Measure both models with the same settings (``kwargs`` of :func:`measure_speed`)."""
    dense = measure_speed(dense_model, **kwargs)
    pruned = measure_speed(pruned_model, **kwargs)
    return SpeedComparison.from_results(dense, pruned)
