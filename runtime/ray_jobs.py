"""Many files on a Ray cluster: a callable class for Ray Data's `Dataset.map_batches`.

Each Ray actor builds one `Transcriber`, which loads the artifacts once, then transcribes batch
after batch of rows with `runtime.transcribe_batch`:

    import ray
    from runtime.ray_jobs import Transcriber

    files = ray.data.from_items([{"path": "/shared/audio/a.mp3"}, {"path": "/shared/audio/b.mp3"}])
    # or audio bytes: ray.data.read_binary_files("s3://bucket/audio/", include_paths=True)
    results = files.map_batches(
        Transcriber,
        fn_constructor_kwargs=dict(model_dir="/shared/artifacts/tiny", batch_size=8, language="en"),
        batch_size=8,                                   # files per call: their chunks are batched together
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=4),     # 4 workers, one loaded model each
        num_cpus=1,                                     # CPUs Ray reserves per worker
    )
    for row in results.iter_rows():
        print(row["path"], row["error"] or row["text"])

`transcribe_dataset(files, model_dir, workers=4, ...)` makes that call. The rows going in have a
`path` column (a file every worker can open) or a `bytes` column (the file's content; `path`, if
there too, only names it in messages). Every column but `bytes` comes out again, with:
- `result`: the whole result as JSON, exactly what `runtime.transcribe_batch` returns for the file
  (and what `runtime transcribe -f json` writes): `json.loads(row["result"])`; "" on error;
- `text`, `language`: the result's, for convenience; "" on error;
- `error`: "" when the file was transcribed, else one line saying why (missing file, not audio ...).
One file that fails costs only its own row: the others of its batch are still transcribed.

Nothing here imports ray until `connect` or `transcribe_dataset` is called: `Transcriber` itself is
plain Python, and `runtime transcribe-many` without `--ray` calls it in its own process.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

if TYPE_CHECKING:  # `runtime --help` imports this module: numpy only when files are transcribed
    import numpy as np

# output columns, in this order after the input's
RESULT_COLUMNS = ("text", "language", "result", "error")


class Transcriber:
    """Loads the artifacts once; each call transcribes one batch of rows (a dict of columns).

    model_dir, device, threads, compute_type: as `runtime.load_model` (on a cluster, `model_dir` must be readable
    by every worker: shared storage, or a folder shipped with the job's runtime_env). batch_size and
    every other keyword: as `runtime.transcribe_batch` (language, task, temperature, beam_size,
    without_timestamps, sample_len, initial_prompt ...); they are checked here, before any file, so
    a bad option stops the workers as they start instead of failing every row. audio_timeout: seconds
    ffmpeg may take to decode one file (none by default).
    """

    def __init__(self, model_dir: str | os.PathLike, *, device: str = "cpu", threads: Optional[int] = None,
                 compute_type: str = "exact", batch_size: int = 8, audio_timeout: Optional[float] = None, **options):
        _import_pyarrow_first()
        from .api import load_model, transcribe_batch

        self._transcribe_batch = transcribe_batch
        self.model = load_model(model_dir, device=device, threads=threads, compute_type=compute_type)
        self.batch_size = batch_size
        self.audio_timeout = audio_timeout
        self.options = options
        transcribe_batch(self.model, [], batch_size=batch_size, **options)  # checks the options, decodes nothing

    def __call__(self, batch: Mapping[str, Sequence]) -> Dict[str, list]:
        columns = {name: list(values) for name, values in batch.items() if name != "bytes"}
        contents = list(batch["bytes"]) if "bytes" in batch else None
        paths = [_text(p) for p in columns["path"]] if "path" in columns else None
        if contents is None and paths is None:
            raise ValueError("Transcriber needs a 'path' or a 'bytes' column")
        count = len(contents if contents is not None else paths)

        outcomes: List[object] = [None] * count  # a result dict, or the one-line error
        loaded: List[int] = []
        samples: List[np.ndarray] = []
        for i in range(count):
            label = paths[i] if paths is not None else f"row {i}"
            try:
                audio = self._load(label, contents[i] if contents is not None else None)
            except Exception as exc:  # a file that cannot be read fails its row, not the batch
                outcomes[i] = _one_line(exc)
                continue
            loaded.append(i)
            samples.append(audio)
        for i, outcome in zip(loaded, self._transcribe(samples)):
            outcomes[i] = outcome

        out: Dict[str, list] = {**columns, **{name: [] for name in RESULT_COLUMNS}}
        for outcome in outcomes:
            ok = isinstance(outcome, dict)
            out["text"].append(outcome["text"] if ok else "")
            out["language"].append(outcome["language"] if ok else "")
            # json.dumps(result) is what openai-whisper's json writer (and ours) write
            out["result"].append(json.dumps(outcome) if ok else "")
            out["error"].append("" if ok else outcome)
        return out

    def _load(self, label: str, content) -> np.ndarray:
        from .audio import AudioError, load_audio

        if content is None:
            return load_audio(label, timeout=self.audio_timeout)
        # ffmpeg reads a file: some containers (mp4, m4a) need to seek, which a pipe cannot do
        with tempfile.NamedTemporaryFile(suffix=os.path.splitext(label)[1]) as file:
            file.write(bytes(content))
            file.flush()
            try:
                return load_audio(file.name, timeout=self.audio_timeout)
            except AudioError as exc:  # name the row, not the temporary file
                raise AudioError(str(exc).replace(file.name, label)) from None

    def _transcribe(self, samples: List[np.ndarray]) -> List[object]:
        """One result per input, or the one-line error of an input that cannot be transcribed."""
        if not samples:
            return []
        try:
            return self._transcribe_batch(self.model, samples, batch_size=self.batch_size, **self.options)
        except Exception as exc:  # one bad input must not cost its whole batch: find it
            if len(samples) == 1:
                return [_one_line(exc)]
            return [self._transcribe([audio])[0] for audio in samples]


def transcribe_dataset(dataset, model_dir: str | os.PathLike, *, workers: int = 1, files_per_call: int = 8,
                       cpus_per_worker: float = 1, device: str = "cpu", threads: Optional[int] = None,
                       compute_type: str = "exact", batch_size: int = 8, ray_remote_args: Optional[dict] = None, **options):
    """`dataset.map_batches(Transcriber, ...)` with `workers` actors, each holding one model and
    reserving `cpus_per_worker` CPUs (and one GPU with device="gpu"), each call taking `files_per_call`
    rows. ray_remote_args go to map_batches as they are (memory=, runtime_env=, num_gpus= ...). Lazy, as
    Ray Data is: iterate or write the returned dataset to run it."""
    import ray.data

    if workers < 1 or files_per_call < 1:
        raise ValueError("workers and files_per_call must be at least 1")
    remote_args = dict(num_cpus=cpus_per_worker, **({"num_gpus": 1} if device == "gpu" else {}))
    remote_args.update(ray_remote_args or {})
    return dataset.map_batches(
        Transcriber,
        fn_constructor_kwargs=dict(model_dir=str(model_dir), device=device, threads=threads, compute_type=compute_type,
                                   batch_size=batch_size, **options),
        batch_size=files_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **remote_args,
    )


class RayConnectError(Exception):
    """Ray cannot be reached or started: one line."""


LOCAL = "local"  # `--ray` without an address: a Ray instance of this process's own, on this machine


def connect(address: Optional[str] = LOCAL, *, timeout: float = 60.0, num_cpus: Optional[int] = None):
    """`ray.init` for a job of this process; returns the ray module, or raises RayConnectError (one line).

    address: LOCAL (or None) starts a private Ray instance on this machine (`num_cpus` of its CPUs,
    all by default); "auto" finds a cluster as Ray does (RAY_ADDRESS, or one `ray start`ed here);
    "HOST:PORT" is a cluster's head (GCS) and "ray://HOST:PORT" a Ray Client server. A host:port is
    first tried with a plain TCP connection within `timeout`, since Ray itself retries an address
    that does not answer for minutes. ray.init runs in this thread: Ray's daemons die with the thread
    that started them (PR_SET_PDEATHSIG), so it cannot be put in one that ends; a caller that must
    not wait on a cluster that accepts connections but never answers sets a watchdog of its own
    (`runtime transcribe-many` does).
    """
    local = address in (None, "", LOCAL)
    host_port = None if local or address == "auto" else _host_port(address)
    if local or (host_port is not None and _is_loopback(host_port[0])):
        # Ray rewrites a loopback address into this machine's network address, and a local instance
        # listens there; this keeps both on loopback (Ray's own switch, read when ray is imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if host_port is not None:
        try:
            socket.create_connection(host_port, timeout=timeout).close()
        except OSError as exc:
            reason = exc.strerror or _one_line(exc)
            raise RayConnectError(f"cannot reach a Ray cluster at {address}: {reason}") from None

    import logging

    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if local:
        kwargs.update(address="local", num_cpus=num_cpus)
    else:
        kwargs.update(address=address)
    try:
        ray.init(**kwargs)
    except Exception as exc:
        where = "start a local Ray instance" if local else f"connect to Ray at {address}"
        raise RayConnectError(f"cannot {where}: {_one_line(exc)}") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise RayConnectError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or {LOCAL}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _import_pyarrow_first() -> None:
    """Load pyarrow, if it is installed, before MAX loads a model. pyarrow 26's first compute call
    crashes (SIGSEGV) in a process where MAX 26.7 has already initialized compiled graphs, and Ray Data
    computes with pyarrow in every worker and driver; loaded the other way round, both work. A Ray
    worker imports pyarrow before it builds a Transcriber; this covers any other process."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _one_line(exc: BaseException) -> str:
    from .audio import AudioError
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .tokenizer import TokenizerError

    text = " ".join(str(exc).split())
    if isinstance(exc, (AudioError, DecodingError, ArtifactError, TokenizerError, RayConnectError)) and text:
        return text  # the runtime's own errors are written to be read as they are
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
