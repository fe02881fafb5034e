"""How much accelerator memory pruning a model takes, without loading a weight.

`estimate_memory(config, ...)` counts every buffer a pruning step keeps alive -- the base
weights as they are stored (int8 + row scales, 4-bit + block scales, or bf16), the LoRA
factors, their gradients and AdamW states, the activations saved for backward, the loss,
the transient work of the importance criterion -- and reports the largest sum that is alive
*at the same moment*. `MemoryEstimate.total` is the largest of the four phases of a step;
`MemoryEstimate.phases` shows what each one holds, so the numbers add up by construction.

    model_configs   the shipped configs, and a model built from a config on the meta device
    shapes          layer widths and parameter counts, read off that model by `discover`
    settings        the step's settings, and what the criterion costs (asked of the registry)
    storage         weights, LoRA, optimizer, gradients, score buffers
    activations     saved for backward, the loss, one layer's backward
    phases          what is alive together at each phase's peak
    memory          `estimate_memory`, `compare_criteria`
    recipe          the settings a recipe runs (`hfprune estimate RECIPE.yaml`, `hfprune plan`)
    report          `MemoryEstimate`, the tables

The estimate is for the memory tensors occupy (`torch.cuda.max_memory_allocated`).
A GPU also needs the CUDA context and allocator slack; `MemoryEstimate.fits`
adds both. Not modelled: bitsandbytes' outlier columns (threshold 6.0; a few
columns of the input), kernel workspaces (cuBLAS, flash attention), and the
difference between an autocast run (SDPA in bf16) and the fp32 activations
assumed for a quantized base prepared for k-bit training.
"""

from .memory import compare_criteria, estimate_memory
from .model_configs import MODEL_CONFIG_DIR, available_model_configs, build_meta_model, load_model_config
from .phases import PERSISTENT
from .recipe import estimate_recipe, recipe_model_source, recipe_settings
from .report import COMPONENT_LABELS, GiB, MemoryEstimate, comparison_markdown
from .shapes import LayerShapes, ModelShapes, model_shapes

__all__ = [
    "COMPONENT_LABELS",
    "GiB",
    "LayerShapes",
    "MODEL_CONFIG_DIR",
    "MemoryEstimate",
    "ModelShapes",
    "PERSISTENT",
    "available_model_configs",
    "build_meta_model",
    "compare_criteria",
    "comparison_markdown",
    "estimate_memory",
    "estimate_recipe",
    "load_model_config",
    "model_shapes",
    "recipe_model_source",
    "recipe_settings",
]
