"""Seeded random-weight checkpoints in openai-whisper's format, for tests and benchmarks.

No official checkpoint can be downloaded here, so tests build one with official dimensions:
`{"dims": ..., "model_state_dict": ...}` with fp16 tensors, like the files openai publishes.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DIMS = dict(n_mels=80, n_vocab=51865, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                 n_audio_layer=4, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)


def random_state_dict(dims: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of openai-whisper's model, drawn from N(0, 0.02); layer norms start at 1 and 0.

    openai-whisper leaves `decoder.positional_embedding` uninitialised (torch.empty), so it is drawn
    like the rest; the encoder's sinusoidal positional embedding is a buffer and keeps its value.
    """
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims))
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.split(".")[-2]
            if module.endswith("_ln") or module in ("ln", "ln_post"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02)
    return {name: tensor.half() for name, tensor in model.state_dict().items()}


def write_random_checkpoint(path: Path, dims: dict = TINY_DIMS, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dict(dims), "model_state_dict": random_state_dict(dims, seed)}, path)
    return path


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-random.pt")
    write_random_checkpoint(out, TINY_DIMS, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(out)
