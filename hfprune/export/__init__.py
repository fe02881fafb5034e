"""Export: a pruned model becomes a dense safetensors checkpoint that loads everywhere.

    from hfprune.export import save_pruned
    save_pruned(model, "out/", masks=masks, original_checkpoint="org/base-model", tokenizer=tokenizer)

Uniformly pruned models get a stock config; heterogeneous ones an `hfprune_<family>` config
with `per_layer_config`, and the loading code shipped beside the weights.

    from hfprune.export import export_gguf
    export_gguf("out/pruned", "out/pruned.gguf", outtype="q8_0")     # for llama.cpp / Ollama / LM Studio

Names are imported on first use, so `hfprune.export.registration` can be imported at
`import hfprune` without pulling in torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "save_pruned": "save",
    "export_gguf": "gguf",
    "save_pruned_from_adapters": "adapters",
    "build_export_config": "config",
    "register_auto_classes": "registration",
    "PickleCheckpointError": "safety",
    "check_no_pickles": "safety",
    "validate_checkpoint_shapes": "safety",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import save_pruned_from_adapters
    from .config import build_export_config
    from .gguf import export_gguf
    from .registration import register_auto_classes
    from .safety import PickleCheckpointError, check_no_pickles, validate_checkpoint_shapes
    from .save import save_pruned
