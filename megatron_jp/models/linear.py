"""The linear seam: every projection of the model, and its tensor-parallel twin, is an nn.Linear.

`linear()` is the one factory: the encoder's projections (fused QKV, attention output, MLP, head) and
the tensor-parallel layers (parallel/layers.py, nn.Linear subclasses holding their shard) are built by
it. A module swap that finds linears by `isinstance(m, nn.Linear)` (torchao's float8 training, a
quantiser, a LoRA wrapper) therefore reaches all of them. `swap_linears` runs such a swap and keeps
what a subclass adds around its base's matmul: a tensor-parallel linear whose nn.Linear base is
replaced by, say, Float8Linear still runs its collectives around the new matmul.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

# (subclass, new base) -> the subclass's behaviour over the new base, built once per pair
_TWINS: dict[tuple[type, type], type] = {}


def linear(in_features: int, out_features: int, bias: bool, cls: type[nn.Linear] = nn.Linear,
           **kwargs) -> nn.Linear:
    """y = x W^T + b with W (out_features, in_features); `cls` a subclass (tensor-parallel ones take
    their group as keyword arguments). Values come from init_weights, not from nn.Linear's init."""
    return cls(in_features, out_features, bias=bias, **kwargs)


def twin_class(subclass: type[nn.Linear], base: type[nn.Linear]) -> type[nn.Linear]:
    """`subclass` over `base` instead of nn.Linear: its forward's `super().forward` reaches `base`'s."""
    if (subclass, base) not in _TWINS:
        _TWINS[(subclass, base)] = type(f"{subclass.__name__}[{base.__name__}]", (subclass, base), {})
    return _TWINS[(subclass, base)]


def keep_subclass(old: nn.Linear, new: nn.Linear) -> nn.Linear:
    """`new` (the swap of `old`) with the behaviour `old`'s subclass adds around nn.Linear's matmul:
    its class becomes the twin of both and it takes `old`'s own attributes (a process group...)."""
    if type(old) is nn.Linear or isinstance(new, type(old)):
        return new
    own = {k: v for k, v in vars(old).items() if not k.startswith("_") and k not in vars(new)}
    new.__class__ = twin_class(type(old), type(new))
    new.__dict__.update(own)
    return new


def swap_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Linear],
                 wanted: Callable[[nn.Linear, str], bool]) -> list[str]:
    """Replace every nn.Linear of `model` for which wanted(module, name) holds by convert(module), a
    root-module swap such as torchao's `convert_to_float8_training(module, config=...)`, keeping
    tensor-parallel subclasses' collectives (keep_subclass). Returns the swapped names. Parameters
    stay the same objects under the same names when `convert` keeps them (torchao's does)."""
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and wanted(m, name)]
    for name, old in chosen:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, keep_subclass(old, convert(old)))
    return [name for name, _ in chosen]
