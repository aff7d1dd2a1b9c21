"""Tolerances shared by the GPU kernel tests (imported by name: pytest puts this folder on sys.path)."""

import torch


def tolerance(dtype: torch.dtype) -> dict:
    """Kernel output against an fp32 oracle computed from the same (upcast) inputs.

    fp32: the kernels' own fp32 error: a few ulp (1e-5 relative), plus absolute terms near 1e-6 that
    do not shrink with the result (the reduced sincos, 1 +- erf/tanh cancelling), scaled by |x| <= ~5.
    bf16 / fp16: the kernel rounds its fp32 result once, half an ulp: 2^-9 (bf16) or 2^-12 (fp16)
    relative; the bound is doubled, plus the same fp32 absolute term.
    """
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=2e-5)
    return dict(rtol=2**-8 if dtype == torch.bfloat16 else 2**-11, atol=2e-5)
