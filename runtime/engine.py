"""Loads prebuilt MAX artifacts and runs them: the production implementation of runtime.inference.

Never compiles and never imports torch: `.mef` files are read with max.engine.read and initialized
with the target's weights (made by make compile) bound as they are, read from their file.
Everything is checked against the manifest first; a
mismatch is an ArtifactError naming the command that rebuilds what is wrong.
"""

from __future__ import annotations

import json
import mmap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from contracts import (COMPUTE_TYPES, FIX_CONVERT, STEP_CACHES_AT, WEIGHTS_ALIGNMENT, ContractError, cpu_features,
                       max_version, read_manifest, read_model_json, sha256_file, target_folder)

from .audio import AudioError, load_mel_filters
from .host_arrays import HostArrayPool
from .host_threads import in_halves
from .inference import ModelDimensions
from .tokenizer import preload_encoding

GRAPHS = ("encoder", "decoder_prefill", "decoder_step", "decoder_alignment")
# Read and initialized on first use, not at load: only word timestamps run it, and an initialized
# graph holds its file's pages and its own buffers (base: 72 MB of resident memory, tiny.en 32 MB).
ON_FIRST_USE = ("decoder_alignment",)


class ArtifactError(Exception):
    """A one-line, user-facing reason why artifacts cannot be used, with the command that fixes it."""


@dataclass
class Target:
    device: str  # "cpu" or "gpu"
    arch: str | None
    compute_type: str = "exact"  # contracts.COMPUTE_TYPES

    @property
    def folder(self) -> str:
        return target_folder(self.device, self.arch, self.compute_type)


def _resolve_target(device: str, compute_type: str = "exact") -> Target:
    from max import driver

    if compute_type not in COMPUTE_TYPES:
        raise ArtifactError(f"unknown compute type {compute_type!r}; use one of {', '.join(COMPUTE_TYPES)}")
    if compute_type == "int8" and device != "cpu":
        raise ArtifactError("compute type int8 is a CPU build; use --device cpu")
    if device == "cpu":
        return Target("cpu", None, compute_type)
    if device != "gpu":
        raise ArtifactError(f"unknown device {device!r}; use cpu or gpu")
    if driver.accelerator_count() == 0:
        raise ArtifactError("--device gpu asked for, but no GPU is attached to this machine; use --device cpu")
    return Target("gpu", driver.accelerator_architecture_name())


def _built_target(model_dir: Path, attached: Target) -> Target:
    """The target whose artifacts run on the attached device: its own, else a base architecture's.
    MAX names Hopper GPUs (H100, H200) sm_90a, the architecture with its arch-specific features;
    artifacts compiled for plain sm_90 run there too (measured on an H200: the same tokens as on CPU)."""
    if attached.device == "gpu" and attached.arch and attached.arch.endswith("a"):
        base = Target("gpu", attached.arch[:-1])
        if not (model_dir / attached.folder).is_dir() and (model_dir / base.folder).is_dir():
            return base
    return attached


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


# MAX's CPU worker threads, by the name AsyncRT gives its pool ("🔥 Thread0", "🔥 Thread1", ...)
_WORKER_THREAD_PREFIX = "🔥 Thread"
WORKER_NICE_VARIABLE = "WHISPER_MAX_WORKER_NICE"
DEFAULT_WORKER_NICE = 10


def lower_worker_priority() -> None:
    """Runs MAX's CPU worker threads at a nice value WHISPER_MAX_WORKER_NICE (default 10) above this
    thread's, so that the host's work between two graph calls is not slowed by their spinning.

    After every graph call MAX's workers keep polling for work for several milliseconds (its busy-wait,
    MODULAR_THREAD_BUSY_WAIT_US, cannot be changed through the Python API: the session then asks for
    other options than the CPU device was made with, and the process aborts). On 2 cores the host's
    decoding work after a step (beam search's log-softmax over the vocabulary, moving the beams'
    caches) then shares its core with them and took two to three times as long (base, beam 5: 4.4 s
    of host time in a 154 s file, 2.4-2.9 s with the workers at +10). While a graph runs the host
    thread waits, so the workers have the cores to themselves and the graphs run as fast as before
    (measured). What it costs: beside other busy processes at the default priority, the workers get
    a smaller share of a contended core than they would at this process's own priority; 0 leaves
    them there. The increase is process-wide and kept (an unprivileged process cannot lower it again).
    """
    import os

    raw = os.environ.get(WORKER_NICE_VARIABLE, "").strip()
    try:
        increment = int(raw) if raw else DEFAULT_WORKER_NICE
    except ValueError:
        increment = -1
    if not 0 <= increment <= 19:
        raise ArtifactError(f"{WORKER_NICE_VARIABLE} must be a whole number from 0 to 19, got {raw!r}")
    if not increment or not os.path.isdir("/proc/self/task"):  # Linux only: threads have their own nice there
        return
    target = min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment)  # 0: this thread's nice, on Linux
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                if not f.read().startswith(_WORKER_THREAD_PREFIX):
                    continue
            if os.getpriority(os.PRIO_PROCESS, int(tid)) < target:
                os.setpriority(os.PRIO_PROCESS, int(tid), target)
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue


class MaxAudioFeatures:
    def __init__(self, buffer, batch_size: int):
        self.buffer = buffer
        self._batch_size = batch_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def row(self, i: int) -> "MaxAudioFeatures":
        """Window i's features alone (a view, no copy)."""
        if not 0 <= i < self._batch_size:
            raise IndexError(f"row {i} of a batch of {self._batch_size}")
        return MaxAudioFeatures(_rows(self.buffer, i, i + 1), 1)


class WhisperModel:
    """A loaded model: dims, tokenizer and mel assets, and the compiled graphs (runtime.engine.GRAPHS)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 verify_checksums: bool = True, compute_type: str = "exact"):
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
        # every transcription's first window needs the tokenizer: made while the graphs load
        preload_encoding(str(self.tokenizer_path), self.num_languages)
        self.mel_filters_path = self.model_dir / model["mel_filters"]["file"]
        try:  # once per model, not once per transcription
            self.mel_filters = load_mel_filters(self.mel_filters_path, self.dims.n_mels)
        except AudioError as exc:
            raise ArtifactError(f"{exc}; {fix_convert}") from None

        self.target = _resolve_target(device, compute_type)
        fix_compile = (f"run `make compile NAME={self.model_dir.name} DEVICE={self.target.device}"
                       + (f" ARCH={self.target.arch}" if self.target.arch else "")
                       + (" DECODER_WEIGHTS=int8`" if compute_type == "int8" else "`"))
        self.target = _built_target(self.model_dir, self.target)
        target_dir = self.model_dir / self.target.folder
        try:
            manifest = read_manifest(target_dir, fix_compile)
        except ContractError as exc:
            raise ArtifactError(str(exc)) from None
        self._check_manifest(manifest, model, fix_compile)
        # the decoder step's cross-attention keys and values: float32, or float16 in the int8 build
        step_inputs = manifest["graphs"]["decoder_step"].get("inputs") or []
        cross_input = STEP_CACHES_AT + 2 * self.dims.n_text_layer
        self.cross_dtype = (step_inputs[cross_input]["dtype"].removeprefix("DType.")
                            if len(step_inputs) > cross_input else "float32")

        # the graphs' weights, made by make compile from the checkpoint's (manifest: weights)
        entry = manifest.get("weights") or {}
        weights_path = target_dir / str(entry.get("file", ""))
        if not entry.get("file") or not weights_path.is_file():
            raise ArtifactError(f"{weights_path} not found; {fix_compile}")
        if weights_path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(f"{weights_path} is {weights_path.stat().st_size} bytes, the manifest records "
                                f"{entry.get('bytes')} (truncated or replaced); {fix_compile}")
        # Cold start: the checksums (the graphs' files and the weights, 190 MB for base) are computed
        # on two other threads while this one reads the weights and makes the graphs.
        # Each graph's file is checked before MAX reads it, the weights before this returns.
        pool = ThreadPoolExecutor(max_workers=2)
        try:
            graph_sha256, weights_sha256 = {}, None
            if verify_checksums:
                for name, graph in manifest["graphs"].items():
                    path = target_dir / graph["file"]
                    if not path.is_file():
                        raise ArtifactError(f"{path} not found; {fix_compile}")
                    if name not in ON_FIRST_USE:  # those are checked when they are read
                        graph_sha256[name] = pool.submit(sha256_file, path)
                weights_sha256 = pool.submit(sha256_file, weights_path)
            self._load_graphs(manifest, target_dir, weights_path, threads, graph_sha256 if verify_checksums else None,
                              fix_compile)
            if weights_sha256 is not None and weights_sha256.result() != entry.get("sha256"):
                raise ArtifactError(f"{weights_path} does not match the sha256 recorded for it (corrupt or replaced); "
                                    f"{fix_compile}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _load_graphs(self, manifest: dict, target_dir: Path, weights_path: Path, threads: int | None,
                     graph_sha256: dict | None, fix_compile: str) -> None:
        """graph_sha256: each eagerly loaded graph's checksum (a future), None to skip the checks."""
        from max import driver
        from max.engine import InferenceSession

        limit_threads(threads)  # only when asked: it pins the whole process (see limit_threads)
        self._device = driver.CPU() if self.target.device == "cpu" else driver.Accelerator()
        self._host = driver.CPU()
        global _cpu_device_made
        _cpu_device_made = True
        self.session = InferenceSession(devices=[self._device])
        self._host_arrays = HostArrayPool()  # the decoder sessions' large host arrays (runtime.host_arrays)
        if self.target.device == "cpu":
            lower_worker_priority()  # MAX's worker threads exist once the session does
        tensors = _read_weights(weights_path, fix_compile, _gathered_weights(manifest))
        self._weights = tensors  # the graphs' buffers are views of these arrays: they live as long as the model

        def graph_weight(spec: dict):
            array = tensors.get(spec["name"])
            if array is None or array.dtype != np.dtype(spec["dtype"]) or list(array.shape) != list(spec["shape"]):
                found = "none" if array is None else f"{array.dtype} {list(array.shape)}"
                raise ArtifactError(f"{weights_path} holds {found} for weight {spec['name']!r}, the graphs expect "
                                    f"{spec['dtype']} {list(spec['shape'])}; {fix_compile}")
            return self._to_device(array)

        # one array per weight name, shared by every graph that uses it
        specs = {spec["name"]: spec for name in GRAPHS for spec in manifest["graphs"][name]["weights"]}
        bound = {name: graph_weight(spec) for name, spec in specs.items()}
        self.graphs = {}
        self._unloaded = {}
        for name in GRAPHS:
            entry = manifest["graphs"][name]
            registry = {spec["name"]: bound[spec["name"]] for spec in entry["weights"]}
            if name in ON_FIRST_USE:
                checksum = entry["sha256"] if graph_sha256 is not None else None
                self._unloaded[name] = (target_dir / entry["file"], checksum, registry, fix_compile)
            else:
                if graph_sha256 is not None and graph_sha256[name].result() != entry["sha256"]:
                    raise ArtifactError(f"{target_dir / entry['file']} does not match the sha256 recorded for it "
                                        f"(corrupt or replaced); {fix_compile}")
                self.graphs[name] = self._init_graph(target_dir / entry["file"], registry, fix_compile)
        self._graph_lock = threading.Lock()

    def _init_graph(self, path: Path, registry: dict, fix_compile: str):
        from max.engine import read

        try:
            return self.session.init(read(path), weights_registry=registry)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"cannot load {path} ({first}); {fix_compile}") from None

    def _graph(self, name: str):
        """A compiled graph; an ON_FIRST_USE one is checked against its sha256 and read on the first call."""
        graph = self.graphs.get(name)
        if graph is not None:
            return graph
        with self._graph_lock:
            if name not in self.graphs:
                path, checksum, registry, fix_compile = self._unloaded[name]
                if not path.is_file():
                    raise ArtifactError(f"{path} not found; {fix_compile}")
                if checksum is not None and sha256_file(path) != checksum:
                    raise ArtifactError(f"{path} does not match the sha256 recorded for it "
                                        f"(corrupt or replaced); {fix_compile}")
                self.graphs[name] = self._init_graph(path, registry, fix_compile)
                del self._unloaded[name]
            return self.graphs[name]

    def _check_manifest(self, manifest: dict, model: dict, fix: str) -> None:
        problems = []
        installed = max_version()
        if manifest.get("max_version") != installed:
            problems.append(f"built with MAX {manifest.get('max_version')}, this is MAX {installed}")
        if manifest.get("device") != self.target.device or manifest.get("arch") != self.target.arch:
            problems.append(f"built for {manifest.get('device')} {manifest.get('arch') or ''}".rstrip()
                            + f", running on {self.target.device} {self.target.arch or ''}".rstrip())
        if self.target.device == "cpu":
            here = cpu_features()
            lacking = [feature for feature in manifest.get("cpu_features") or () if here and feature not in here]
            if lacking:
                problems.append(f"built on a CPU with {', '.join(lacking)}, which this CPU lacks")
        if manifest.get("model", {}).get("weights_sha256") != model["weights"]["sha256"]:
            problems.append("built for other weights than model.json records")
        if manifest.get("model", {}).get("dims") != model["dims"]:
            problems.append("built for other dimensions than model.json records")
        built_int8 = manifest.get("decoder_weights", {}).get("dtype") == "int8"
        if built_int8 != (self.target.compute_type == "int8"):
            problems.append(f"holds an {'int8' if built_int8 else 'exact'} build, compute type "
                            f"{self.target.compute_type} was asked for")
        elif built_int8 and manifest["decoder_weights"].get("logits") != "rescored":
            problems.append("holds an int8 build of an earlier version (its graphs leave the logits near the best "
                            "to the runtime)")
        missing = [g for g in GRAPHS if g not in manifest.get("graphs", {})]
        if missing:
            problems.append(f"lacks graph(s) {', '.join(missing)}")
        if problems:
            raise ArtifactError(f"artifacts in {self.model_dir / self.target.folder} are stale: {problems[0]}; {fix}")

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
        encoder = self.graphs["encoder"]
        if self.target.device != "cpu" or mel.shape[0] == 1:
            (features,) = encoder.execute(self._to_device(mel))
            return MaxAudioFeatures(features, mel.shape[0])
        # On CPU, one window at a time: the same numbers (each window is computed on its own either
        # way) for about 7% more encoder time (tiny.en), where a batch of 8 would hold its attention
        # scores, [8, head, 1500, 1500] fp32 (base: 576 MB), all at once.
        features = np.empty((mel.shape[0], self.dims.n_audio_ctx, self.dims.n_audio_state), dtype=np.float32)
        for i in range(mel.shape[0]):
            (window,) = encoder.execute(self._to_device(mel[i:i + 1]))
            features[i:i + 1] = window.to_numpy()
        return MaxAudioFeatures(self._to_device(features), mel.shape[0])

    def decoder(self, audio_features: MaxAudioFeatures, repeats: int = 1) -> "MaxDecoderSession":
        return MaxDecoderSession(self, audio_features, repeats)

    def row_batch(self, max_rows: int) -> "MaxRowBatch":
        """Decoder rows that join and leave a running batch (runtime.continuous)."""
        return MaxRowBatch(self, max_rows)

    def cross_attention_scores(self, audio_features: MaxAudioFeatures, tokens: np.ndarray,
                               heads: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Logits [n, vocab] and the heads' cross-attention scores [len(heads), n, n_audio_ctx] of
        one token sequence over one window (the decoder_alignment graph)."""
        if audio_features.batch_size != 1:
            raise ValueError(f"word alignment takes one window's features, got a batch of {audio_features.batch_size}")
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(1, -1))
        flat_heads = np.array([layer * self.dims.n_text_head + head for layer, head in heads], dtype=np.int64)
        logits, scores = self._graph("decoder_alignment").execute(
            self._to_device(tokens), self._to_device(flat_heads), audio_features.buffer)
        return self._to_host(logits), self._to_host(scores)


class MaxDecoderSession:
    """A decoding pass: the self-attention cache and the cross-attention keys and values stay in
    MAX buffers from one call to the next.

    The self-attention cache lives in buffers with room for more positions than it holds
    (`capacity`); each step writes its position into them in place, and they are reallocated,
    larger, only when full. On CPU they are numpy arrays MAX reads and writes directly, so a
    reorder moves rows in place.

    The cross-attention keys and values are computed once per audio row and never copied: each
    token row attends to the audio row `kv_rows` names, so the `repeats` rows of one audio (beam
    search's beams, best-of's samples) read one copy between them, and a reorder, even across
    audios, only changes the map. When every row of an audio starts from the same tokens (beam
    search and best-of always do) the prefill runs once per audio and its self-attention cache is
    copied to the audio's rows.

    A reorder copies a row's cache only from the first position where its tokens and its new
    source's differ: a position's keys and values are a function of the audio and the tokens up to
    it (each row is computed on its own, whatever rows share its step), so rows of one audio with the
    same tokens up to a position hold the same cache up to it, bit for bit. Beams mostly differ in
    their last few tokens. For the same reason a step reads those shared positions once for all of
    an audio's rows, from its first row's cache (_prefixes; tiny.en's beam search: 31% of the reads).
    """

    # positions of room a cache gets past its prefill, and again each time it fills up
    ROOM = 128

    def __init__(self, model: WhisperModel, audio_features: MaxAudioFeatures, repeats: int = 1):
        self.model = model
        self.audio_features = audio_features
        self.repeats = repeats  # consecutive rows that serve one audio (beam search, best-of)
        self.kv_rows = np.repeat(np.arange(audio_features.batch_size, dtype=np.int64), repeats)
        self._kv_rows_buffer = None
        self.self_cache: list = []  # per layer k_t [rows, head, head_dim, capacity], v [rows, head, capacity, head_dim]
        self._host_cache: list | None = None  # the same memory as numpy arrays, where MAX shares it (CPU)
        self.capacity = 0  # positions the cache buffers have room for
        self.cross: list = []
        self.length = 0
        self.tokens = np.zeros((0, 0), dtype=np.int64)  # [rows, n_text_ctx]: each row's tokens, its first `length`

    def prefill(self, tokens: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        m = self.model
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.shape[0] != len(self.kv_rows):
            raise ValueError(f"{tokens.shape[0]} token rows for {len(self.kv_rows)} decoder rows")
        n_audio, repeats = self.audio_features.batch_size, self.repeats
        self.kv_rows = np.repeat(np.arange(n_audio, dtype=np.int64), repeats)
        self._kv_rows_buffer = None
        self.tokens = np.zeros((len(tokens), m.dims.n_text_ctx), dtype=np.int64)
        self.tokens[:, :tokens.shape[1]] = tokens
        per_audio = tokens.reshape(n_audio, repeats, -1)
        shared = repeats == 1 or bool((per_audio == per_audio[:, :1]).all())
        features = self.audio_features.buffer
        if shared:
            tokens = np.ascontiguousarray(per_audio[:, 0])
        else:  # rows of one audio start differently: one prefill row (and cross copy) per row
            features = m._to_device(np.repeat(m._to_host(features), repeats, axis=0))
            self.kv_rows = np.arange(len(self.kv_rows), dtype=np.int64)
        n_cache = 2 * m.dims.n_text_layer
        positions = m._to_device(np.asarray(positions, dtype=np.int64))
        if m.target.device == "cpu" and len(tokens) > 1:
            cache, self.cross, logits = self._prefill_rows(tokens, positions, features)
        else:
            outputs = m.graphs["decoder_prefill"].execute(m._to_device(tokens), positions, features)
            self.cross = list(outputs[1 + n_cache:])
            cache = [m._to_host(b) for b in outputs[1:1 + n_cache]]
            logits = m._to_host(outputs[0])  # after the caches: see MaxRowBatch.join
        self.length = tokens.shape[1]
        if shared and repeats > 1:
            logits = np.repeat(logits, repeats, axis=0)
        self._install(cache, min(m.dims.n_text_ctx, self.length + self.ROOM), repeats if shared else 1)
        del cache
        m._host_arrays.drop_free()  # lets go of what stays free: the last session's leftovers, the prefill's caches
        return logits

    def _prefill_rows(self, tokens: np.ndarray, positions, features) -> tuple[list, list, np.ndarray]:
        """decoder_prefill one row at a time (CPU), each row's outputs copied into arrays of all the rows
        before the next call: the same values as one call over all of them (each row is computed on its
        own either way), where one call over n rows held every row's intermediates at once besides its
        outputs: base, 8 windows of 5 beams, 1,200 -> 1,000 MB at the prefill (AMD EPYC), the same time
        from the second batch on (the first pays ~0.4 s more, in page faults of the arrays it fills).
        Returns the self-attention cache arrays, the cross-attention buffers and the logits."""
        m = self.model
        whole = None
        for row in range(len(tokens)):
            outputs = m.graphs["decoder_prefill"].execute(m._to_device(tokens[row:row + 1]), positions,
                                                          _rows(features, row, row + 1))
            arrays = [m._to_host(b) for b in outputs[1:]] + [m._to_host(outputs[0])]  # the logits last
            if whole is None:  # the model's pool: the memory the last batch's prefill filled (host_arrays)
                whole = [m._host_arrays.take((len(tokens), *a.shape[1:]), a.dtype) for a in arrays]
            for into, array in zip(whole, arrays):
                into[row] = array[0]
        n_cache = 2 * m.dims.n_text_layer
        return whole[:n_cache], [m._to_device(a) for a in whole[n_cache:-1]], whole[-1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        m = self.model
        tokens = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))
        if self.length >= self.capacity:
            if self.length >= m.dims.n_text_ctx:
                raise ValueError(f"the decoder holds at most {m.dims.n_text_ctx} positions")
            self._install(self._cache_arrays(), min(m.dims.n_text_ctx, self.capacity + self.ROOM))
            m._host_arrays.drop_free()  # the outgrown cache
        if self._kv_rows_buffer is None:
            self._kv_rows_buffer = m._to_device(self.kv_rows)
        prefix_rows, prefix_lengths = self._prefixes()
        logits, = m.graphs["decoder_step"].execute(
            m._to_device(tokens), m._to_device(np.full(len(tokens), self.length, dtype=np.int64)), self._kv_rows_buffer,
            m._to_device(prefix_rows), m._to_device(prefix_lengths), *self.self_cache, *self.cross)
        self.tokens[:, self.length] = tokens[:, 0]
        self.length += 1
        return m._to_host(logits)

    # reorder takes fewer rows than the session has: the others leave the batch (BeamSearchDecoder drops
    # the rows of audios whose candidates are complete)
    drops_rows = True

    def reorder(self, source_indices: Sequence[int]) -> None:
        """Row i becomes the old row source_indices[i]; rows beyond len(source_indices) leave the batch."""
        index = np.asarray(source_indices, dtype=np.int64)
        rows = len(index)
        moved = np.flatnonzero(index != np.arange(rows))  # rows that continue another row
        if moved.size == 0 and rows == len(self.kv_rows):
            return
        cache, n, sources = self._cache_arrays(), self.length, index[moved]
        # the positions from the first where a moved row's tokens and its source's differ (the class's docstring)
        differ = self.tokens[moved, :n] != self.tokens[sources, :n]
        differ[self.kv_rows[moved] != self.kv_rows[sources], 0] = True  # another audio's row: all of it
        start = int(differ.any(axis=0).argmax()) if differ.any() else n

        def layers(first: int, stop: int) -> None:
            for k_t, v in zip(cache[2 * first:2 * stop:2], cache[2 * first + 1:2 * stop:2]):
                k_t[moved, ..., start:n] = k_t[sources, ..., start:n]
                v[moved, :, start:n] = v[sources, :, start:n]

        if start < n:
            in_halves(len(cache) // 2, layers)  # memory-bound copies: the other core moves half the layers
        self.tokens = self.tokens[index]
        if rows < len(self.kv_rows):  # the first rows are the batch now: the step reads views of them
            cache = [array[:rows] for array in cache]
            if self._host_cache is not None:
                self.self_cache = [_rows(buffer, 0, rows) for buffer in self.self_cache]
                self._host_cache = cache
        if self._host_cache is None:  # the device's copy is separate: send the moved rows back
            self._install(cache, self.capacity)
        self.kv_rows = self.kv_rows[index]
        self._kv_rows_buffer = None

    # -- the self-attention cache ----------------------------------------------------------
    def _prefixes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's prefix row, the first row of its audio, and the positions before the first where
        their tokens differ: the step reads those once from the prefix row's cache for all the audio's
        rows (beams share the prompt and most of what they decoded; the class's docstring says why the
        values are the same)."""
        if len(self.kv_rows) == 1:  # one row (greedy decoding of one window): its own prefix, whole
            return np.zeros(1, dtype=np.int64), np.full(1, self.length, dtype=np.int64)
        _, first_rows, audio_of_row = np.unique(self.kv_rows, return_index=True, return_inverse=True)
        prefix_rows = first_rows[audio_of_row].astype(np.int64)
        n = self.length
        differ = self.tokens[:, :n] != self.tokens[prefix_rows, :n]
        prefix_lengths = np.where(differ.any(axis=1), differ.argmax(axis=1), n).astype(np.int64)
        return prefix_rows, prefix_lengths

    def _cache_arrays(self) -> list:
        """The cache as numpy arrays: the buffers' own memory on CPU, a copy from a GPU."""
        if self._host_cache is not None:
            return self._host_cache
        return [self.model._to_host(b) for b in self.self_cache]

    def _install(self, cache: list, capacity: int, repeats: int = 1) -> None:
        """Makes the step's cache buffers from `cache` (its first self.length positions), with room
        for `capacity` positions, each row of `cache` as `repeats` rows (a prefill's audio row for its beams)."""
        m, n = self.model, self.length
        arrays = []
        for k_t, v in zip(cache[0::2], cache[1::2]):
            arrays += [_with_room(k_t, n, capacity, keys=True, repeats=repeats, pool=m._host_arrays),
                       _with_room(v, n, capacity, keys=False, repeats=repeats, pool=m._host_arrays)]
        self.self_cache = [m._to_device(a) for a in arrays]
        self.capacity = capacity
        shares = m.target.device == "cpu" and all(
            np.shares_memory(a, b.to_numpy()) for a, b in zip(arrays, self.self_cache))
        self._host_cache = arrays if shares else None


# safetensors' dtype names -> numpy's, for the dtypes a target's weights have
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I64": np.int64}


def _gathered_weights(manifest: dict) -> frozenset[str]:
    """The weights the graphs only gather rows of: the int8 build's fp16 token embedding (the token lookup and
    the logits recomputed near each row's best, graph_builders/graphs.py), of which a transcription touches
    a part (base, lecture-en.flac: ~17 of 53 MB). _read_weights maps them instead of reading them: the
    int8 build's peak RSS 25-39 MB lower (tiny.en and base, greedy and beam search; AMD EPYC)."""
    if (manifest.get("decoder_weights") or {}).get("logits") != "rescored":
        return frozenset()
    return frozenset(spec["name"] for graph in manifest["graphs"].values() for spec in graph["weights"]
                     if spec.get("source") == "decoder.token_embedding.weight" and spec.get("transform") == "none")


def _read_weights(path: Path, fix: str, mapped: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """A target's weights file (a safetensors file: an 8-byte header length, a JSON header of each tensor's
    dtype, shape and byte range, then the data) as arrays over one buffer it is read into, each tensor on a
    cache line (make compile writes the data on a WEIGHTS_ALIGNMENT boundary). safetensors' own loader
    copies every tensor out of its mapping (85 ms for base) where this is one read (~30 ms); mapping the
    file instead would leave the kernels reading 4 KB pages (measured: a base step 2-4% slower), where
    numpy's large buffers are transparent huge pages.

    The tensors named in `mapped`, which the graphs only gather rows of, are not read: each is a
    copy-on-write mapping of its bytes in the file (writable: MAX copies a read-only array), so only the
    pages of the rows a transcription touches become resident."""
    try:
        size = path.stat().st_size
        raw = np.empty(size + WEIGHTS_ALIGNMENT, dtype=np.uint8)
        shift = -raw.ctypes.data % WEIGHTS_ALIGNMENT
        data = raw[shift:shift + size]
        view = memoryview(data)
        with open(path, "rb", buffering=0) as f:
            _read_range(f, view, 0, min(8, size))
            length = int.from_bytes(data[:8].tobytes(), "little") if size >= 8 else 0
            if not 0 < length < min(size - 7, 1 << 24):
                raise ValueError("no safetensors header")
            _read_range(f, view, 8, 8 + length)
            header = json.loads(data[8:8 + length].tobytes())
            if not isinstance(header, dict):
                raise ValueError("no safetensors header")
            start = 8 + length
            ranges = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                first, last = (start + int(i) for i in info["data_offsets"])
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                if not start <= first <= last <= size or first % dtype.itemsize:
                    raise ValueError(f"tensor {name} lies outside the file")
                ranges[name] = (first, last, dtype, info["shape"])
            done = start  # the data, but for the mapped tensors' bytes (sorted by where they lie)
            for first, last in sorted((ranges[n][0], ranges[n][1]) for n in mapped if n in ranges):
                _read_range(f, view, done, first)
                done = max(done, last)
            _read_range(f, view, done, size)
            arrays = {}
            for name, (first, last, dtype, shape) in ranges.items():
                if name in mapped:
                    arrays[name] = _mapped_array(f, first, last, dtype, shape)
                else:
                    arrays[name] = data[first:last].view(dtype).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot read {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            f"{fix}") from None
    if start % WEIGHTS_ALIGNMENT:  # written so by make compile (graph_builders/weights.py)
        raise ArtifactError(f"{path} was not written by this version's make compile; {fix}")
    return arrays


def _read_range(f, view: memoryview, first: int, last: int) -> None:
    """Reads bytes first:last of the open file f into view[first:last]."""
    f.seek(first)
    done = first
    while done < last:
        n = f.readinto(view[done:last])
        if not n:
            raise ValueError(f"ends at byte {done} of {last}")
        done += n


def _mapped_array(f, first: int, last: int, dtype: np.dtype, shape) -> np.ndarray:
    """Bytes first:last of the open file f as a writable copy-on-write mapping, read from the file a page at
    a time as they are touched (MADV_RANDOM: the graphs gather rows, the pages around one are not needed)."""
    page = mmap.ALLOCATIONGRANULARITY
    begin = first // page * page
    if last == first:
        return np.empty(0, dtype=dtype).reshape(shape)
    mapping = mmap.mmap(f.fileno(), last - begin, access=mmap.ACCESS_COPY, offset=begin)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapping, dtype=dtype, count=(last - first) // dtype.itemsize,
                         offset=first - begin).reshape(shape)


def _with_room(cache: np.ndarray, n: int, capacity: int, keys: bool, repeats: int = 1,
               pool: HostArrayPool | None = None) -> np.ndarray:
    """A self-attention cache (keys k_t [rows, head, head_dim, positions] or values v [rows, head,
    positions, head_dim]) with its first n positions in an array of `capacity` positions, zero
    beyond them (the stock-ops step reads every position), each row repeated `repeats` times: copied
    once into place, where np.repeat first would copy the filled positions twice (base, 8 audios x 5
    beams at 150 positions: 86 -> 48 ms). From `pool` where given (a session's: runtime.host_arrays)."""
    axis = 3 if keys else 2
    shape = list(cache.shape)
    shape[0] *= repeats
    shape[axis] = capacity
    room = np.zeros(shape, dtype=np.float32) if pool is None else pool.take(shape, np.float32, zeros=True)
    filled = (slice(None),) * axis + (slice(0, n),)
    # [rows, repeats, ...]: every repeat of a row takes the row's positions
    room.reshape(len(cache), repeats, *shape[1:])[(slice(None),) + filled] = cache[filled][:, None]
    return room


def _rows(buffer, start: int, stop: int):
    """Rows start:stop of a buffer, as a view (MAX's Buffer takes an index for every dimension)."""
    return buffer[(slice(start, stop),) + (slice(None),) * (buffer.rank - 1)]


class MaxRowBatch:
    """Decoder rows that join and leave a running batch (the server's continuous batching; the
    host side is runtime.continuous).

    Each row has its own audio, its own tokens and its own length: the step takes one position
    per row, so a row that joins mid-way steps beside rows that are far along. The self-attention
    caches are slot pools [slots, head, ..., n_text_ctx] whose first `len(self)` slots are the
    active rows, in order; a row that leaves is replaced by the last row, so the active rows stay
    one contiguous block the step reads as a view. The cross-attention keys and values sit in
    slot pools of their own and are never moved: `kv_rows` maps each row to its audio's slot.
    Pools grow by doubling up to `max_rows` and are released when the last row leaves, so an idle
    server holds none.
    """

    def __init__(self, model: WhisperModel, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        self.slots = 0
        self.self_pool: list = []  # per layer k_t [slots, head, head_dim, n_ctx], v [slots, head, n_ctx, head_dim]
        self.cross_pool: list = []  # per layer k_t [slots, head, head_dim, n_audio_ctx], v [slots, ...]
        self.kv_rows: list[int] = []  # each active row's cross slot
        self.positions: list[int] = []  # each active row's next position (the tokens in its cache)
        self._free_cross: list[int] = []
        self._step_inputs = None  # the views and maps a step passes, until the rows change
        self._kept_slots = 0  # slots held while idle too (reserve)

    def __len__(self) -> int:
        return len(self.kv_rows)

    def join(self, features: MaxAudioFeatures, tokens: Sequence[int], logit_positions: Sequence[int]) -> np.ndarray:
        """Prefills one row (one window's audio features, batch 1, and its initial tokens) and adds
        it as the last row; returns the prefill's logits [1, len(logit_positions), vocab]."""
        m, n_layer = self.model, self.model.dims.n_text_layer
        if len(self) >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if features.batch_size != 1:
            raise ValueError(f"a row takes one window's features, got a batch of {features.batch_size}")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        outputs = m.graphs["decoder_prefill"].execute(
            m._to_device(tokens), m._to_device(np.asarray(logit_positions, dtype=np.int64)), features.buffer)
        self._reserve(len(self) + 1)
        row, n = len(self), tokens.shape[1]
        cross_slot = self._free_cross.pop()
        for pool, computed in zip(self.cross_pool, outputs[1 + 2 * n_layer:]):
            _rows(pool, cross_slot, cross_slot + 1).inplace_copy_from(computed)
        for i, computed in enumerate(outputs[1: 1 + 2 * n_layer]):
            room = _with_room(m._to_host(computed), n, m.dims.n_text_ctx, keys=i % 2 == 0)
            _rows(self.self_pool[i], row, row + 1).inplace_copy_from(m._to_device(room))
        self.kv_rows.append(cross_slot)
        self.positions.append(n)
        self._step_inputs = None
        # The logits are read last, as always: reading a prefill's logits before its caches were copied
        # gave wrong tokens, intermittently (tests/test_batched.py, test_ray.py, test_serve.py), for
        # reasons not pinned down.
        return m._to_host(outputs[0])

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """One token per active row, in row order -> logits [rows, vocab]."""
        m = self.model
        if len(tokens) != len(self) or not len(self):
            raise ValueError(f"{len(tokens)} tokens for {len(self)} rows")
        if max(self.positions) >= m.dims.n_text_ctx:
            raise ValueError(f"the decoder holds at most {m.dims.n_text_ctx} positions")
        if self._step_inputs is None:
            rows = len(self)
            # each row its own audio: every row reads its own cache (no prefix row)
            self._step_inputs = (m._to_device(np.asarray(self.kv_rows, dtype=np.int64)),
                                 m._to_device(np.arange(rows, dtype=np.int64)), m._to_device(np.zeros(rows, np.int64)),
                                 [_rows(pool, 0, rows) for pool in self.self_pool])
        kv_rows, prefix_rows, prefix_lengths, caches = self._step_inputs
        logits, = m.graphs["decoder_step"].execute(
            m._to_device(np.asarray(tokens, dtype=np.int64).reshape(-1, 1)),
            m._to_device(np.asarray(self.positions, dtype=np.int64)), kv_rows, prefix_rows, prefix_lengths,
            *caches, *self.cross_pool)
        self.positions = [p + 1 for p in self.positions]
        return m._to_host(logits)

    def leave(self, row: int) -> None:
        """Drops a row; the last row takes its place (row numbers after it are unchanged)."""
        last = len(self) - 1
        self._free_cross.append(self.kv_rows[row])
        if row != last:
            for pool in self.self_pool:
                _rows(pool, row, row + 1).inplace_copy_from(_rows(pool, last, last + 1))
            self.kv_rows[row], self.positions[row] = self.kv_rows[last], self.positions[last]
        self.kv_rows.pop()
        self.positions.pop()
        self._step_inputs = None
        if not self.kv_rows and not self._kept_slots:  # idle: give the pools back (a burst of requests
            self.self_pool, self.cross_pool, self._free_cross, self.slots = [], [], [], 0  # does not hold them)

    def reserve(self, rows: int) -> None:
        """Makes the pools hold `rows` rows (at most max_rows) now, and keeps them while idle: for a
        caller that knows how many windows come. Growing 1, 2, 4, 8 slots instead leaves MAX's
        allocator holding the smaller pools' memory (base's 4 x 154 s batch: about 80 MB more at the peak)."""
        self._kept_slots = min(rows, self.max_rows)
        self._reserve(self._kept_slots)

    def _reserve(self, rows: int) -> None:
        """Grows the pools (doubling, at most max_rows slots) to hold `rows` rows."""
        if rows <= self.slots:
            return
        from max.driver import Buffer
        from max.dtype import DType

        m, d = self.model, self.model.dims
        self._step_inputs = None  # its views would hold the old pools
        slots = min(self.max_rows, max(rows, 2 * self.slots))
        head_dim = d.n_text_state // d.n_text_head

        def grown(old, shape, dtype):
            pool = Buffer.zeros([slots, *shape], dtype, device=m._device)
            if old is not None:
                _rows(pool, 0, self.slots).inplace_copy_from(old)
            return pool

        self_shapes = [(d.n_text_head, head_dim, d.n_text_ctx), (d.n_text_head, d.n_text_ctx, head_dim)]
        cross_shapes = [(d.n_text_head, head_dim, d.n_audio_ctx), (d.n_text_head, d.n_audio_ctx, head_dim)]
        # one pool at a time, each old one released as soon as it is copied: the old pools are never
        # all held beside the new ones (base, 4 -> 8 slots: the old ones are 190 MB)
        for pools, shapes, dtype in ((self.self_pool, self_shapes, DType.float32),
                                     (self.cross_pool, cross_shapes, getattr(DType, m.cross_dtype))):
            if not pools:
                pools.extend([None] * (2 * d.n_text_layer))
            for i in range(len(pools)):
                pools[i] = grown(pools[i], shapes[i % 2], dtype)
        self._free_cross = list(range(slots - 1, self.slots - 1, -1)) + self._free_cross
        self.slots = slots
