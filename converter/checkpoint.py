"""Reading Whisper checkpoints in openai's format: `{"dims": {...}, "model_state_dict": {...}}`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from contracts import sha256_file

DIM_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
              "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")


# The Mel filter banks openai-whisper ships (assets/mel_filters.npz): 80 bins, and 128 for large-v3 and turbo.
SUPPORTED_N_MELS = (80, 128)
# Whisper's language codes, in token order (whisper.tokenizer.LANGUAGES): a vocabulary holds the first n.
MAX_LANGUAGES = 100


def language_info(n_vocab: int) -> tuple[bool, int]:
    """openai-whisper's rule (whisper/model.py): multilingual vocabularies have 51,865 or more
    tokens; the language tokens fill the gap between the 51,765 base tokens and the task tokens.
    51864: English-only (99 language tokens, unused); 51865: 99 languages; 51866 (large-v3): 100."""
    is_multilingual = n_vocab >= 51865
    return is_multilingual, n_vocab - 51765 - int(is_multilingual)


class ConversionError(Exception):
    """A one-line, user-facing reason why a checkpoint cannot be converted."""


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    dims: dict
    state_dict: dict  # name -> torch.Tensor, in the file's order


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load safely (`weights_only=True`: no arbitrary unpickling) and check the openai layout."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}")
    try:
        # Memory-mapped: large-v3's 3 GB of tensors are read from the page cache as needed instead
        # of copied into memory. Files from before torch's zip format cannot be mapped; read those.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        data = None
    try:
        if data is None:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path} is not a loadable PyTorch checkpoint: {reason}") from None
    if not isinstance(data, dict) or "dims" not in data or "model_state_dict" not in data:
        raise ConversionError(f"{path} is not a Whisper checkpoint in openai's format "
                              "(expected a dict with 'dims' and 'model_state_dict')")
    dims, state = data["dims"], data["model_state_dict"]
    missing = [f for f in DIM_FIELDS if not isinstance(dims, dict) or not isinstance(dims.get(f), int)]
    if missing:
        raise ConversionError(f"{path}: 'dims' lacks integer field(s) {', '.join(missing)}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: 'model_state_dict' is not a mapping of tensors")
    # which tensors and dims Whisper has is checked for every format alike (sources.check_tensors)
    return Checkpoint(path=path, sha256=sha256_file(path), dims={f: dims[f] for f in DIM_FIELDS}, state_dict=state)


def check_supported(path: Path, dims: dict) -> None:
    """Dimensions the tokenizer and Mel assets exist for; anything else fails here, before a file is written."""
    if dims["n_mels"] not in SUPPORTED_N_MELS:
        raise ConversionError(f"{path}: n_mels={dims['n_mels']} has no Mel filter bank in openai-whisper "
                              f"(it ships {' and '.join(map(str, SUPPORTED_N_MELS))})")
    _, num_languages = language_info(dims["n_vocab"])
    if not 1 <= num_languages <= MAX_LANGUAGES:
        raise ConversionError(f"{path}: n_vocab={dims['n_vocab']} is not a Whisper vocabulary "
                              "(51864 English-only, 51865 multilingual, 51866 for large-v3)")


def expected_tensor_names(dims: dict) -> set[str]:
    """Every tensor openai-whisper's model holds for these dimensions (its state_dict keys)."""
    names = {"encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
             "encoder.positional_embedding", "encoder.ln_post.weight", "encoder.ln_post.bias",
             "decoder.token_embedding.weight", "decoder.positional_embedding",
             "decoder.ln.weight", "decoder.ln.bias"}

    def block(prefix: str, cross: bool) -> set[str]:
        attns = ["attn", "cross_attn"] if cross else ["attn"]
        out = set()
        for attn in attns:
            out |= {f"{prefix}.{attn}.{p}.{k}" for p in ("query", "value", "out") for k in ("weight", "bias")}
            out |= {f"{prefix}.{attn}.key.weight", f"{prefix}.{attn}_ln.weight", f"{prefix}.{attn}_ln.bias"}
        out |= {f"{prefix}.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
        out |= {f"{prefix}.mlp_ln.weight", f"{prefix}.mlp_ln.bias"}
        return out

    for i in range(dims["n_audio_layer"]):
        names |= block(f"encoder.blocks.{i}", cross=False)
    for i in range(dims["n_text_layer"]):
        names |= block(f"decoder.blocks.{i}", cross=True)
    return names
