"""The encoder, its presets and its Hugging Face key maps."""

from torch import nn

EMBEDDING_PARAMS = ("embeddings.tok.weight", "embeddings.pos.weight", "embeddings.types.weight")


def count_parameters(model: nn.Module) -> dict:
    """Total parameters (a tied decoder counted once) and those outside the embedding tables."""
    total = embedding = 0
    for name, param in model.named_parameters():  # named_parameters yields a shared tensor once
        total += param.numel()
        if name in EMBEDDING_PARAMS:
            embedding += param.numel()
    return {"params_total": total, "params_non_embedding": total - embedding}
