"""Weight dtypes as users spell them in configs, recipes and flags: one table, one message."""

from __future__ import annotations

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
DTYPE_CHOICES = "float32, float16, bfloat16 (or fp32, fp16, bf16)"


def canonical_dtype(value: object, error: type[Exception] = ValueError) -> str:
    """'bf16', 'BFloat16', 'torch.bfloat16' -> 'bfloat16'; anything else raises `error`."""
    name = str(value).lower().removeprefix("torch.")
    if name not in DTYPE_ALIASES:
        raise error(f"dtype {value!r} is not one of {DTYPE_CHOICES}")
    return DTYPE_ALIASES[name]
