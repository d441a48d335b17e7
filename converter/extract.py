"""Extract stage: checkpoint -> artifacts/<name>/ (weights.safetensors, model.json, tokenizer, mel filters).

Every file is written under a temporary name and renamed into place; model.json goes last, so a
folder with a model.json is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from contracts import MODEL_FORMAT, atomic_write, sha256_file, write_json

from .checkpoint import language_info
from .sources import Source

# Bumped whenever the converter records something new in model.json, so older folders convert again.
CONVERTER_VERSION = 3
WEIGHTS_FILE = "weights.safetensors"
MEL_FILTERS_FILE = "mel_filters.npz"


def whisper_assets() -> Path:
    """openai-whisper's assets folder (tokenizers, Mel filters), found without importing whisper (and torch)."""
    import importlib.util

    return Path(importlib.util.find_spec("whisper").origin).parent / "assets"


def extract(source: Source, out_dir: Path, name: str) -> dict:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    dims = source.dims
    is_multilingual, num_languages = language_info(dims["n_vocab"])

    state = {key: np.ascontiguousarray(array) for key, array in source.tensors.items()}
    weights_path = out_dir / WEIGHTS_FILE
    atomic_write(weights_path, lambda p: save_file(state, str(p), metadata={"source_sha256": source.sha256}))

    assets = whisper_assets()
    tokenizer_name = "multilingual.tiktoken" if is_multilingual else "gpt2.tiktoken"
    atomic_write(out_dir / tokenizer_name, lambda p: shutil.copyfile(assets / tokenizer_name, p))
    with np.load(assets / "mel_filters.npz") as all_filters:
        key = f"mel_{dims['n_mels']}"
        filters = all_filters[key]
    atomic_write(out_dir / MEL_FILTERS_FILE, lambda p: np.savez_compressed(open(p, "wb"), **{key: filters}))

    model = {
        "format": MODEL_FORMAT,
        "converter_version": CONVERTER_VERSION,
        "name": name,
        "dims": dims,
        "is_multilingual": is_multilingual,
        "num_languages": num_languages,
        # openai's table for official files, or what the folder's config records; None means "use the
        # last half of the decoder layers", openai-whisper's own default when a model has no table entry.
        "alignment_heads": source.alignment_heads,
        "source": source.describe(),
        "tensor_count": len(state),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size,
                    "dtypes": sorted({str(a.dtype) for a in state.values()})},
        "tokenizer": {"file": tokenizer_name, "sha256": sha256_file(out_dir / tokenizer_name)},
        "mel_filters": {"file": MEL_FILTERS_FILE, "key": key, "sha256": sha256_file(out_dir / MEL_FILTERS_FILE)},
    }
    write_json(out_dir / "model.json", model)
    return model
