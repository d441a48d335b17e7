"""Validate stage: the safetensors hold the checkpoint's exact bits, and a forward pass built from
them alone (converter/reference.py) matches openai-whisper's torch model on fixed inputs."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from contracts import write_json

from .checkpoint import ConversionError
from .sources import Source

# fp32 torch against a float64 numpy pass over the same fp16-valued weights: differences come from
# torch's float32 rounding only, so they sit far below these bounds.
TOLERANCE = {"encoder_max_abs": 1e-3, "logits_max_abs": 1e-3}
VALIDATION_SEED = 1234
PREFIX_LENGTH = 12


def fixed_inputs(dims: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(VALIDATION_SEED)
    mel = rng.uniform(-1.0, 1.5, size=(dims["n_mels"], 2 * dims["n_audio_ctx"])).astype(np.float32)
    tokens = rng.integers(0, dims["n_vocab"], size=PREFIX_LENGTH)
    return mel, tokens


def _errors(ours: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs": float(diff.max()), "max_rel": float((diff / (np.abs(reference) + 1e-6)).max()),
            "reference_max_abs": float(np.abs(reference).max())}


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class _NumpyTensors(Mapping):
    """The safetensors' tensors as float64 numpy arrays, read when asked for."""

    def __init__(self, handle):
        self._handle = handle
        self._names = list(handle.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        return self._handle.get_tensor(name).astype(np.float64)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def validate(source: Source, artifact_dir: Path) -> dict:
    import torch
    from safetensors import safe_open
    from whisper.model import ModelDimensions, Whisper

    from .reference import NumpyWhisper

    started = time.perf_counter()
    model_json = json.loads((artifact_dir / "model.json").read_text())
    # Read tensor by tensor (memory-mapped), so a large model is never held twice in memory.
    stored = safe_open(str(artifact_dir / model_json["weights"]["file"]), framework="np")
    names = set(stored.keys())
    if names != set(source.tensors):
        raise ConversionError(f"{artifact_dir}: safetensors and checkpoint hold different tensor names")
    mismatched = [name for name, array in source.tensors.items() if not _bit_equal(array, stored.get_tensor(name))]
    if mismatched:
        raise ConversionError(f"{len(mismatched)} tensor(s) differ from the checkpoint, e.g. {mismatched[0]}")

    mel, tokens = fixed_inputs(source.dims)
    model = Whisper(ModelDimensions(**source.dims))
    # openai's own torch model (float32 parameters) gets the same arrays; load_state_dict widens
    # them as it copies. np.array: torch cannot take the read-only views of a mapped source file.
    model.load_state_dict({name: torch.from_numpy(np.array(array)) for name, array in source.tensors.items()})
    model = model.eval()
    with torch.no_grad():
        torch_audio = model.encoder(torch.from_numpy(mel)[None])
        torch_logits = model.decoder(torch.from_numpy(tokens)[None], torch_audio)[0].numpy()
        torch_audio = torch_audio[0].numpy()
    del model  # large-v3's fp32 copy is 6 GB

    reference = NumpyWhisper(_NumpyTensors(stored), source.dims)
    ours_audio = reference.encode(mel)
    ours_logits = reference.logits(tokens, ours_audio)

    report = {
        "tensors": {"count": len(names), "bit_equal": len(names)},
        "inputs": {"seed": VALIDATION_SEED, "mel_shape": list(mel.shape), "tokens": tokens.tolist()},
        "encoder": _errors(ours_audio, torch_audio),
        "logits": _errors(ours_logits, torch_logits),
        "tolerance": TOLERANCE,
        "seconds": round(time.perf_counter() - started, 2),
    }
    report["passed"] = (report["encoder"]["max_abs"] <= TOLERANCE["encoder_max_abs"]
                        and report["logits"]["max_abs"] <= TOLERANCE["logits_max_abs"])
    write_json(artifact_dir / "validation.json", report)
    if not report["passed"]:
        raise ConversionError(f"validation failed: encoder max abs error {report['encoder']['max_abs']:.3g}, "
                              f"logits {report['logits']['max_abs']:.3g} (tolerance {TOLERANCE}); "
                              f"see {artifact_dir / 'validation.json'}")
    return report
