"""GPU tier: every test here needs a CUDA device and is skipped without one. Tests of a fused kernel
also need its extension built (`pip install --no-build-isolation -e .`); they skip without it, or
fail with MEGATRON_JP_REQUIRE_KERNELS=1 (set it where the kernels must have been built)."""

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(no_cuda)


@pytest.fixture
def built():
    """built(op_module): skip (or fail) unless the op module's CUDA extension was built."""

    def check(op_module):
        if op_module._EXT is not None:
            return
        message = f"{op_module.__name__}: CUDA extension not built (pip install --no-build-isolation -e .)"
        if os.environ.get("MEGATRON_JP_REQUIRE_KERNELS") == "1":
            pytest.fail(message)
        pytest.skip(message)

    return check
