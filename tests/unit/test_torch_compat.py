"""A torch that lacks one of the private APIs megatron_jp uses is named, with the API and the tested
versions, instead of failing deep inside a step or a save."""

import pytest
import torch
from torch.distributed.checkpoint import filesystem

from megatron_jp import torch_compat
from megatron_jp.torch_compat import UnsupportedTorch


def test_a_torch_without_the_fused_adamw_kernel_is_named(monkeypatch):
    monkeypatch.delattr(torch, "_fused_adamw_")
    with pytest.raises(UnsupportedTorch, match=r"torch\._fused_adamw_.*tested with torch 2\.13"):
        torch_compat.fused_adamw_([], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6)


def test_a_torch_without_dcp_storage_info_is_named(monkeypatch):
    monkeypatch.delattr(filesystem, "_StorageInfo")
    with pytest.raises(UnsupportedTorch, match="_StorageInfo"):
        torch_compat.storage_info("__0_0.distcp", 0, 8)


def test_a_dcp_writer_hook_with_another_signature_is_named(monkeypatch):
    from megatron_jp.training.checkpoint.dcp_pieces import StreamingWriter

    torch_compat.check_writer_hook(StreamingWriter)  # today's torch: accepted
    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", lambda self, plan, planner, storage: None)
    with pytest.raises(UnsupportedTorch, match=r"write_data\(plan, planner\)"):
        StreamingWriter("/nonexistent")


def test_the_installed_torch_has_every_private_api():
    assert callable(torch._fused_adamw_)
    assert torch_compat.storage_info("x", 1, 2).offset == 1
