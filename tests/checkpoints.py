"""Seeded random-weight checkpoints in openai-whisper's format, for tests and benchmarks.

No official checkpoint can be downloaded here, so tests build one with official dimensions:
`{"dims": ..., "model_state_dict": ...}` with fp16 tensors, like the files openai publishes.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_ENGLISH, VOCAB_MULTILINGUAL, VOCAB_V3 = 51864, 51865, 51866  # .en models, multilingual, large-v3 (100 languages)


def whisper_dims(width: int, heads: int, layers: int, *, n_mels: int = 80, n_vocab: int = VOCAB_MULTILINGUAL,
                 text_layers: int | None = None) -> dict:
    """ModelDimensions fields of a model whose encoder and decoder share width and heads, as openai's do."""
    return dict(n_mels=n_mels, n_vocab=n_vocab, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads,
                n_audio_layer=layers, n_text_ctx=448, n_text_state=width, n_text_head=heads,
                n_text_layer=layers if text_layers is None else text_layers)


TINY_DIMS = whisper_dims(384, 6, 4)

# The dims of every name whisper.available_models() lists, as openai's files record them
# (tests/test_models.py checks each against openai's alignment-head table, which is shaped by them).
_SIZES = {"tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12), "medium": (1024, 16, 24)}
OFFICIAL_DIMS = {
    **{f"{size}.en": whisper_dims(*shape, n_vocab=VOCAB_ENGLISH) for size, shape in _SIZES.items()},
    **{size: whisper_dims(*shape) for size, shape in _SIZES.items()},
    "large-v1": whisper_dims(1280, 20, 32),
    "large-v2": whisper_dims(1280, 20, 32),
    "large-v3": whisper_dims(1280, 20, 32, n_mels=128, n_vocab=VOCAB_V3),
    "large-v3-turbo": whisper_dims(1280, 20, 32, n_mels=128, n_vocab=VOCAB_V3, text_layers=4),
}
OFFICIAL_DIMS["large"] = OFFICIAL_DIMS["large-v3"]
OFFICIAL_DIMS["turbo"] = OFFICIAL_DIMS["large-v3-turbo"]

# Small stand-ins with tiny's widths and layers, for what differs between official models:
TINY_EN_DIMS = OFFICIAL_DIMS["tiny.en"]  # English-only: gpt2 vocabulary, no language or task tokens
LARGE_V3_SHAPED_DIMS = whisper_dims(384, 6, 4, n_mels=128, n_vocab=VOCAB_V3)  # 128 mels, 100 languages


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
    # In place, one tensor at a time: large-v3 holds 6 GB in fp32, and a second, fp16 copy of
    # everything would add 3 GB. The values are those of tensor.half().
    model.half()
    return dict(model.state_dict())


def write_random_checkpoint(path: Path, dims: dict = TINY_DIMS, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dict(dims), "model_state_dict": random_state_dict(dims, seed)}, path)
    return path


if __name__ == "__main__":
    import sys

    # tests/checkpoints.py [OUT.pt] [SEED] [MODEL]: MODEL is an official name (default tiny's dims)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-random.pt")
    preset = sys.argv[3] if len(sys.argv) > 3 else "tiny"
    if preset not in OFFICIAL_DIMS:
        sys.exit(f"error: unknown model {preset!r}; one of {', '.join(OFFICIAL_DIMS)}")
    write_random_checkpoint(out, OFFICIAL_DIMS[preset], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(out)
