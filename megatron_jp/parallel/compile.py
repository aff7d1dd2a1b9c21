"""torch.compile applied from outside, one transformer block at a time (torchtitan's choice).

A block is the unit that repeats: compiling it fuses its norms, residual adds, GLU and RoPE glue
and, on CUDA, compiles flex_attention where that backend runs, while embeddings, the head and the
fused loss stay eager (they run once per micro-batch and hold data-dependent shapes). Blocks are
compiled in place (nn.Module.compile), so parameter names do not change, and with dynamic shapes:
dynamo reuses one graph per block variant (global/local window, train/eval) across sequence
lengths, micro-batch sizes and document layouts, so seq-length curricula stay far below the
recompile limit (tests/unit/test_compile.py counts them).

Inductor's cache (and Triton's) go to a directory that outlives the job (train.compile_cache_dir):
a restarted job loads compiled kernels instead of compiling again under the collective timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def compile_enabled(setting: bool | None, device_type: str) -> bool:
    """train.compile: None (auto) compiles on CUDA only; on CPU the eager path is the reference."""
    return device_type == "cuda" if setting is None else setting


def use_compile_cache(folder: str | os.PathLike):
    """Point Inductor and Triton at `folder` (before the first compilation; a value the user exported
    already wins)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


def compile_blocks(chunk: nn.Module, fullgraph: bool = True, backend: str = "inductor"):
    """Compile every block of a chunk in place. fullgraph: a graph break inside a block is an error
    (tensor-parallel blocks call process-group collectives, which break graphs: pass False there)."""
    for block in chunk.layers.values():
        block.compile(fullgraph=fullgraph, dynamic=True, backend=backend)
