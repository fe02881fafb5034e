"""The formats a quantized base can take, by name: torch-free, so that the recipes' schema (and with it
`hfprune --help`) reads them without importing torch. `bnb4bit` and `quantization` use them."""

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")  # a 4-bit layer's compute dtype
