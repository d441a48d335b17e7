"""openai-whisper's own `.pt` files: `{"dims": {...}, "model_state_dict": {...}}`, loaded with
`torch.load(weights_only=True)` (converter/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_checkpoint
from ..official import alignment_heads, official_name_for
from . import Source, SourceFile, check_tensors


def read(path: Path) -> Source:
    import torch

    checkpoint = load_checkpoint(path)
    tensors = {}
    for name, tensor in checkpoint.state_dict.items():
        # numpy has no bfloat16; its values are exact in float32, so a bf16 file keeps every value
        tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        tensors[name] = tensor.contiguous().numpy()
    check_tensors(checkpoint.path, checkpoint.dims, tensors)
    official = official_name_for(checkpoint.sha256)
    return Source(path=checkpoint.path, format="openai", dims=checkpoint.dims, tensors=tensors,
                  files=[SourceFile(checkpoint.path.name, checkpoint.sha256, checkpoint.path.stat().st_size)],
                  sha256=checkpoint.sha256,
                  alignment_heads=alignment_heads(official, checkpoint.dims) if official else None,
                  notes={"official_name": official})
