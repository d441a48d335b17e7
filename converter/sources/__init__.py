"""Readers of the checkpoint formats users have; each yields the same `Source`.

A reader turns one format into openai-whisper's tensor names and layouts, as numpy arrays, with the
model's dims and what the format says beside the weights (alignment heads). Everything after it,
extraction, validation, compilation, is shared: a new format is a new reader here, not a branch
through the stages. The format is detected from the content, not the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import DIM_FIELDS, ConversionError, check_supported, expected_tensor_names, sha256_file

HEAD_WIDTH = 64  # every Whisper model's attention head width: heads follow from the widths


@dataclass
class SourceFile:
    name: str  # relative to the source path (the file's own name for a single file)
    sha256: str
    bytes: int

    def as_json(self) -> dict:
        return {"file": self.name, "sha256": self.sha256, "bytes": self.bytes}


@dataclass
class Source:
    """A checkpoint read into openai-whisper's terms."""
    path: Path
    format: str  # "openai" | "ctranslate2" | "transformers"
    dims: dict
    tensors: dict  # openai-whisper's state_dict names -> numpy arrays (float16 or float32)
    files: list  # SourceFile of every file the weights came from
    sha256: str  # the weights file's sha256 (the .pt, model.bin, model.safetensors); identifies official files
    alignment_heads: list | None = None  # [layer, head] pairs the folder records, if any
    notes: dict = field(default_factory=dict)  # what the reader decided, recorded in model.json

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.path), "file": self.path.name, "sha256": self.sha256,
                "files": [f.as_json() for f in self.files], **self.notes}


def hashed(root: Path, names) -> list[SourceFile]:
    files = []
    for name in names:
        path = root / name if root.is_dir() else root
        files.append(SourceFile(name=str(name), sha256=sha256_file(path), bytes=path.stat().st_size))
    return files


def narrow_exact_float32(tensors: dict) -> tuple[dict, int]:
    """float32 tensors whose every value is exact in float16 become float16.

    Converters for other runtimes widen openai's float16 weights to float32 (Hugging Face folders
    usually hold them so); narrowing them back loses nothing and lets the graph builders choose the
    fp16-weight decoder kernel, exactly as for openai's own file. Returns (tensors, how many narrowed)."""
    narrowed = 0
    out = {}
    for name, array in tensors.items():
        if array.dtype == np.float32:
            with np.errstate(over="ignore"):
                half = array.astype(np.float16)
            if np.array_equal(half.astype(np.float32), array):
                array, narrowed = half, narrowed + 1
        out[name] = array
    return out, narrowed


def check_tensors(path: Path, dims: dict, tensors: dict) -> None:
    """The mapped tensors are exactly openai-whisper's, with the shapes its model has for these dims."""
    missing = sorted(set(DIM_FIELDS) - set(dims))
    if missing:
        raise ConversionError(f"{path}: could not tell the model's {', '.join(missing)}")
    check_supported(path, dims)
    expected = expected_tensor_names(dims)
    absent = sorted(expected - set(tensors))
    if absent:
        raise ConversionError(f"{path}: missing {len(absent)} Whisper tensor(s), e.g. {absent[0]}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ConversionError(f"{path}: {len(extra)} tensor(s) Whisper has no place for, e.g. {extra[0]}")
    for name, array in tensors.items():
        if array.dtype not in (np.float16, np.float32):
            raise ConversionError(f"{path}: tensor {name} is {array.dtype}; expected float16 or float32")


def read_source(path) -> Source:
    """Detect the format of `path` from its content and read it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"checkpoint not found: {path}")
    if path.is_dir():
        from . import ct2, hf

        if (path / "model.bin").is_file():
            return ct2.read(path)
        if (path / "config.json").is_file():
            return hf.read(path)
        raise ConversionError(f"{path} is neither a faster-whisper (CTranslate2) folder (model.bin + config.json) "
                              "nor a Hugging Face Whisper folder (config.json + model.safetensors)")
    if path.name == "model.bin" or path.name.startswith("model.bin.part"):
        raise ConversionError(f"{path} is a CTranslate2 weights file: pass its folder (model.bin with config.json "
                              "and the vocabulary), not the file")
    from . import openai

    return openai.read(path)  # torch.load says what is wrong with any other file, in one line
