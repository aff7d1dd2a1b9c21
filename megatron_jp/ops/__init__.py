"""Fused ops. Each module holds a pure-torch reference (the CPU fallback and the test oracle) and, where
the CUDA extension was built, a fused kernel behind the same function."""

import importlib


def load_extension(family: str):
    """The compiled `megatron_jp.ops._<family>` module, or None where it was not built."""
    try:
        return importlib.import_module(f"megatron_jp.ops._{family}")
    except ImportError:
        return None
