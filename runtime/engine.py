"""Loads prebuilt MAX artifacts and runs them: the production implementation of runtime.inference.

Never compiles and never imports torch: `.mef` files are read with max.engine.read and initialized
with weights bound from the safetensors. Everything is checked against the manifest first; a
mismatch is an ArtifactError naming the command that rebuilds what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np

from contracts import FIX_CONVERT, ContractError, read_manifest, read_model_json, sha256_file

from .audio import AudioError, load_mel_filters
from .inference import ModelDimensions

GRAPHS = ("encoder", "decoder_prefill", "decoder_step", "decoder_alignment")


class ArtifactError(Exception):
    """A one-line, user-facing reason why artifacts cannot be used, with the command that fixes it."""


def _transform(array: np.ndarray, transform: str) -> np.ndarray:
    """The weight transforms the manifest names (graph_builders/graphs.py, WeightSpec)."""
    if transform == "none":
        return array
    if transform == "transpose":
        return array.T
    if transform == "conv1d_rscf":  # (out, in, k) -> (1, k, in, out)
        return array.transpose(2, 1, 0)[None]
    raise ArtifactError(f"the manifest asks for an unknown weight transform {transform!r}; "
                        "this runtime is older than the artifacts: rebuild them with this version's make compile")


@dataclass
class Target:
    device: str  # "cpu" or "gpu"
    arch: str | None

    @property
    def folder(self) -> str:
        return "cpu" if self.device == "cpu" else f"gpu-{self.arch}"


def _resolve_target(device: str) -> Target:
    from max import driver

    if device == "cpu":
        return Target("cpu", None)
    if device != "gpu":
        raise ArtifactError(f"unknown device {device!r}; use cpu or gpu")
    if driver.accelerator_count() == 0:
        raise ArtifactError("--device gpu asked for, but no GPU is attached to this machine; use --device cpu")
    return Target("gpu", driver.accelerator_architecture_name())


# MAX creates one CPU device per process, with one thread pool sized when it is first made; see
# limit_threads
_cpu_device_made = False
_pinned_threads: int | None = None


def limit_threads(threads: int | None) -> None:
    """Run MAX's CPU kernels on `threads` cores, for the whole process.

    MAX 26.7 cannot size a session's thread pool: InferenceSession(num_threads=N) aborts the process
    on CPU (the process's one CPU device already exists, made with default options, before the
    session applies them; checked: "AsyncRT::getOrCreateCPUDevice called requesting different
    options"). The pool is sized from the CPUs the process may use when that device is first made,
    so the count is set through the process's CPU affinity instead, before the first model loads.
    That changes the process for every thread in it, so only callers that own their process ask
    for it: the `runtime` CLI (--threads), `runtime serve --threads`, and `load_model(threads=N)`
    when asked; by default nothing is changed. Asking after a model was loaded is refused (the
    pool is already sized), unless it asks for the count already set.
    """
    global _pinned_threads
    import os

    if not threads or not hasattr(os, "sched_setaffinity"):
        return
    if threads < 0:
        raise ArtifactError(f"threads must be a positive number, got {threads}")
    if _cpu_device_made:
        if threads == _pinned_threads:
            return
        raise ArtifactError(f"cannot use {threads} threads: MAX sized its CPU thread pool when this process "
                            "loaded its first model; set threads before loading any model")
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[: max(1, threads)])
    _pinned_threads = threads


class MaxAudioFeatures:
    def __init__(self, buffer, batch_size: int):
        self.buffer = buffer
        self._batch_size = batch_size

    @property
    def batch_size(self) -> int:
        return self._batch_size


class WhisperModel:
    """A loaded model: dims, tokenizer and mel assets, and the compiled graphs (runtime.engine.GRAPHS)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 verify_checksums: bool = True):
        from max import driver
        from max.engine import InferenceSession, read

        self.model_dir = Path(model_dir)
        fix_convert = FIX_CONVERT
        try:
            model = read_model_json(self.model_dir)
        except ContractError as exc:
            raise ArtifactError(str(exc)) from None
        self.config = model
        self.dims = ModelDimensions(**model["dims"])
        self.is_multilingual = bool(model["is_multilingual"])
        self.num_languages = int(model["num_languages"])
        self.alignment_heads = model.get("alignment_heads")
        self.tokenizer_path = self.model_dir / model["tokenizer"]["file"]
        self.mel_filters_path = self.model_dir / model["mel_filters"]["file"]
        try:  # once per model, not once per transcription
            self.mel_filters = load_mel_filters(self.mel_filters_path, self.dims.n_mels)
        except AudioError as exc:
            raise ArtifactError(f"{exc}; {fix_convert}") from None

        self.target = _resolve_target(device)
        target_dir = self.model_dir / self.target.folder
        fix_compile = (f"run `make compile NAME={self.model_dir.name} DEVICE={self.target.device}"
                       + (f" ARCH={self.target.arch}`" if self.target.arch else "`"))
        try:
            manifest = read_manifest(target_dir, fix_compile)
        except ContractError as exc:
            raise ArtifactError(str(exc)) from None
        self._check_manifest(manifest, model, fix_compile)

        weights_path = self.model_dir / model["weights"]["file"]
        if not weights_path.is_file():
            raise ArtifactError(f"{weights_path} not found; {fix_convert}")
        expected_bytes = model["weights"].get("bytes")
        if expected_bytes is not None and weights_path.stat().st_size != expected_bytes:
            raise ArtifactError(f"{weights_path} is {weights_path.stat().st_size} bytes, model.json records "
                                f"{expected_bytes} (truncated or replaced); {fix_convert}")
        if verify_checksums:
            for path, expected in [(weights_path, model["weights"]["sha256"]),
                                   *((target_dir / g["file"], g["sha256"]) for g in manifest["graphs"].values())]:
                if not path.is_file():
                    raise ArtifactError(f"{path} not found; {fix_compile}")
                if sha256_file(path) != expected:
                    fix = fix_convert if path == weights_path else fix_compile
                    raise ArtifactError(f"{path} does not match the sha256 recorded for it (corrupt or replaced); {fix}")

        limit_threads(threads)  # only when asked: it pins the whole process (see limit_threads)
        self._device = driver.CPU() if self.target.device == "cpu" else driver.Accelerator()
        self._host = driver.CPU()
        global _cpu_device_made
        _cpu_device_made = True
        self.session = InferenceSession(devices=[self._device])
        tensors = self._load_tensors(weights_path, fix_convert)
        bound: dict[str, object] = {}  # one array per weight name, shared by every graph that uses it
        self.graphs = {}
        for name in GRAPHS:
            entry = manifest["graphs"][name]
            registry = {}
            for spec in entry["weights"]:
                if spec["name"] not in bound:
                    source = tensors.get(spec["source"])
                    if source is None:
                        raise ArtifactError(f"{weights_path} has no tensor {spec['source']!r}; {fix_convert}")
                    array = np.ascontiguousarray(_transform(source, spec["transform"]), dtype=spec["dtype"])
                    if list(array.shape) != list(spec["shape"]):
                        raise ArtifactError(f"tensor {spec['source']} has shape {list(array.shape)} after "
                                            f"{spec['transform']}, the graph expects {spec['shape']}; {fix_compile}")
                    bound[spec["name"]] = self._to_device(array)
                registry[spec["name"]] = bound[spec["name"]]
            try:
                compiled = read(target_dir / entry["file"])
                self.graphs[name] = self.session.init(compiled, weights_registry=registry)
            except (RuntimeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ArtifactError(f"cannot load {target_dir / entry['file']} ({first}); {fix_compile}") from None

    def _check_manifest(self, manifest: dict, model: dict, fix: str) -> None:
        problems = []
        installed = version("max")
        if manifest.get("max_version") != installed:
            problems.append(f"built with MAX {manifest.get('max_version')}, this is MAX {installed}")
        if manifest.get("device") != self.target.device or manifest.get("arch") != self.target.arch:
            problems.append(f"built for {manifest.get('device')} {manifest.get('arch') or ''}".rstrip()
                            + f", running on {self.target.device} {self.target.arch or ''}".rstrip())
        if manifest.get("model", {}).get("weights_sha256") != model["weights"]["sha256"]:
            problems.append("built for other weights than model.json records")
        if manifest.get("model", {}).get("dims") != model["dims"]:
            problems.append("built for other dimensions than model.json records")
        missing = [g for g in GRAPHS if g not in manifest.get("graphs", {})]
        if missing:
            problems.append(f"lacks graph(s) {', '.join(missing)}")
        if problems:
            raise ArtifactError(f"artifacts in {self.model_dir / self.target.folder} are stale: {problems[0]}; {fix}")

    @staticmethod
    def _load_tensors(path: Path, fix: str) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read {path} ({exc}); {fix}") from None

    # -- device transfers ------------------------------------------------------------------
    def _to_device(self, array: np.ndarray):
        from max.driver import Buffer

        buffer = Buffer.from_numpy(np.ascontiguousarray(array))
        return buffer if self.target.device == "cpu" else buffer.to(self._device)

    def _to_host(self, buffer) -> np.ndarray:
        return buffer.to_numpy() if self.target.device == "cpu" else buffer.to(self._host).to_numpy()

    # -- runtime.inference.Inference -------------------------------------------------------
    def encode(self, mel: np.ndarray) -> MaxAudioFeatures:
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        (features,) = self.graphs["encoder"].execute(self._to_device(mel))
        return MaxAudioFeatures(features, mel.shape[0])

    def decoder(self, audio_features: MaxAudioFeatures, repeats: int = 1) -> "MaxDecoderSession":
        features = audio_features.buffer
        if repeats > 1:
            features = self._to_device(np.repeat(self._to_host(features), repeats, axis=0))
        return MaxDecoderSession(self, features, repeats)

    def cross_attention_scores(self, audio_features: MaxAudioFeatures, tokens: np.ndarray,
                               heads: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Logits [n, vocab] and the heads' cross-attention scores [len(heads), n, n_audio_ctx] of
        one token sequence over one window (the decoder_alignment graph)."""
        if audio_features.batch_size != 1:
            raise ValueError(f"word alignment takes one window's features, got a batch of {audio_features.batch_size}")
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
        flat_heads = np.array([layer * self.dims.n_text_head + head for layer, head in heads], dtype=np.int64)
        logits, scores = self.graphs["decoder_alignment"].execute(
            self._to_device(tokens), self._to_device(flat_heads), audio_features.buffer)
        return self._to_host(logits), self._to_host(scores)


class MaxDecoderSession:
    """A decoding pass: the self-attention cache and the cross-attention keys and values stay in
    MAX buffers from one call to the next."""

    def __init__(self, model: WhisperModel, audio_features, repeats: int = 1):
        self.model = model
        self.audio_features = audio_features
        self.repeats = repeats  # consecutive rows that serve one audio (beam search, best-of)
        self.self_cache: list = []
        self.cross: list = []
        self.length = 0

    def prefill(self, tokens: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        m = self.model
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        outputs = m.graphs["decoder_prefill"].execute(
            m._to_device(tokens), m._to_device(np.asarray(positions, dtype=np.int64)), self.audio_features)
        n_cache = 2 * m.dims.n_text_layer
        self.self_cache = list(outputs[1:1 + n_cache])
        self.cross = list(outputs[1 + n_cache:])
        self.length = tokens.shape[1]
        return m._to_host(outputs[0])

    def step(self, tokens: np.ndarray) -> np.ndarray:
        m = self.model
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))
        outputs = m.graphs["decoder_step"].execute(
            m._to_device(tokens), m._to_device(np.array([self.length], dtype=np.int64)), *self.self_cache, *self.cross)
        self.self_cache = list(outputs[1:])
        self.length += 1
        return m._to_host(outputs[0])

    def reorder(self, source_indices: Sequence[int]) -> None:
        m = self.model
        index = np.asarray(source_indices, dtype=np.int64)
        rows = np.arange(len(index))
        if np.array_equal(index, rows):
            return
        self.self_cache = [m._to_device(np.take(m._to_host(b), index, axis=0)) for b in self.self_cache]
        # The rows of one audio hold the same cross-attention keys and values, so a permutation
        # within each group of `repeats` rows (beam search's always is) leaves them valid. They
        # are the big buffers (n_audio_ctx positions per layer): copying them each step would
        # cost more than the step itself.
        if not np.array_equal(index // self.repeats, rows // self.repeats):
            self.cross = [m._to_device(np.take(m._to_host(b), index, axis=0)) for b in self.cross]
