"""`runtime transcribe-many MANIFEST --model DIR -o OUT [--ray [ADDRESS]]`: a manifest of files, one JSON each.

Without `--ray` the files are transcribed here, in this process, `--files-per-call` at a time with
`runtime.transcribe_batch`. With `--ray` the same `runtime.ray_jobs.Transcriber` runs on `--workers`
Ray actors, one model each, and the results stream back here. Either way each file's result is written
to `OUT/<name>.json` (what `runtime transcribe -f json` writes) as soon as it arrives, through a temporary
file renamed into place, so an interrupted run leaves whole files only; `OUT/_summary.json` lists what was
done and what failed. A file that cannot be transcribed costs only itself: the command goes on, then
prints one line per failure and exits 1. The manifest format is runtime/manifest.py's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from .click_types import OptionalFloat, OptionalInt, compute_type_option
from .manifest import SUMMARY_NAME, ManifestError, read_manifest
from .ray_jobs import LOCAL


@click.command("transcribe-many")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="artifact folder made by make convert and make compile; with --ray, a path every worker can read")
@click.option("--output-dir", "-o", required=True, type=click.Path(path_type=Path),
              help="folder for one <name>.json per file and _summary.json")
@click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL, default=None, metavar="[ADDRESS]",
              help="run on Ray: alone (or 'local'), a Ray instance of its own on this machine; HOST:PORT of a "
                   "cluster's head, ray://HOST:PORT (Ray Client), or 'auto' (RAY_ADDRESS / `ray start` here)")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="with --ray: Ray actors, each loading the model once")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="with --ray: CPUs Ray reserves for each worker (with --device gpu, one GPU too)")
@click.option("--files-per-call", type=click.IntRange(min=1), default=8, show_default=True,
              help="files a worker transcribes together (their chunks share decoder batches); "
                   "lowered so that every worker gets files")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="seconds to reach (or start) Ray before giving up")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@compute_type_option
@click.option("--threads", type=int, default=0, show_default=True,
              help="pin each process to its first N CPUs (with --ray, every worker of a node to the same ones); "
                   "0 lets MAX use them all")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="30 s chunks per decoder batch (runtime.transcribe_batch)")
@click.option("--audio-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds ffmpeg may take to decode one file")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default="transcribe", show_default=True)
@click.option("--language", default=None, help="spoken language (name or code); detected per file when omitted")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--temperature-increment-on-fallback", type=OptionalFloat(), default=0.2, show_default=True,
              help="added to the temperature for each chunk that fails; 'none' disables fallback")
@click.option("--best-of", type=OptionalInt(), default=5, show_default=True,
              help="candidates when sampling with temperature > 0; 'none' samples one")
@click.option("--beam-size", type=OptionalInt(), default=5, show_default=True,
              help="beams of beam search at temperature 0; 'none' decodes greedily")
@click.option("--patience", type=float, default=None, help="beam search patience")
@click.option("--length-penalty", type=float, default=None, help="alpha of the length penalty")
@click.option("--suppress-tokens", default="-1", show_default=True,
              help="comma-separated token ids to suppress; -1 suppresses openai-whisper's default set")
@click.option("--initial-prompt", default=None, help="text every chunk is conditioned on")
@click.option("--compression-ratio-threshold", type=OptionalFloat(), default=2.4, show_default=True)
@click.option("--logprob-threshold", type=OptionalFloat(), default=-1.0, show_default=True)
@click.option("--no-speech-threshold", type=OptionalFloat(), default=0.6, show_default=True)
@click.option("--without-timestamps", is_flag=True, help="decode text only, one segment per 30 s chunk")
@click.option("--max-initial-timestamp", type=float, default=1.0, show_default=True)
@click.option("--sample-len", type=int, default=None, help="most tokens sampled per chunk (default n_text_ctx/2)")
def transcribe_many(manifest, model_dir, output_dir, ray_address, workers, cpus_per_worker, files_per_call,
                    connect_timeout, device, compute_type, threads, batch_size, audio_timeout, temperature,
                    temperature_increment_on_fallback, **decode_options) -> None:
    """Transcribe the audio files a MANIFEST lists (a text file of paths, one a line, or JSONL of
    {"path", "id"}) into one JSON result per file, with runtime.transcribe_batch, locally or on Ray."""
    try:
        entries = read_manifest(manifest)
    except ManifestError as exc:
        _fail(str(exc))
    if ray_address is None and workers > 1:
        _fail("--workers needs --ray: without it the files are transcribed in this one process")

    options = dict(temperature=_temperatures(temperature, temperature_increment_on_fallback),
                   condition_on_previous_text=False, **decode_options)
    if options["sample_len"] is None:
        del options["sample_len"]  # transcribe_batch's default (n_text_ctx // 2)
    worker_options = dict(model_dir=str(model_dir), device=device, compute_type=compute_type, threads=threads or None,
                          batch_size=batch_size,
                          audio_timeout=audio_timeout, **options)
    _check_before_starting(model_dir, ray_address, options)
    _prepare_output_dir(output_dir)
    # every worker gets files: a call takes at most an equal share of the manifest
    files_per_call = max(1, min(files_per_call, -(-len(entries) // workers)))

    started = time.monotonic()
    if ray_address is None:
        rows = _run_here(entries, files_per_call, worker_options)
    else:
        rows = _run_on_ray(entries, ray_address, workers, cpus_per_worker, files_per_call, connect_timeout,
                           worker_options)
    failures, written = [], 0
    from tqdm import tqdm

    try:
        with tqdm(total=len(entries), unit="file", disable=None, file=sys.stderr) as progress:
            for row in rows:
                error = row["error"]
                if not error:
                    try:
                        _write_atomically(output_dir / f"{row['name']}.json", row["result"])
                        written += 1
                    except OSError as exc:
                        error = f"cannot write {output_dir / (row['name'] + '.json')}: {exc.strerror or exc}"
                if error:
                    failures.append({"path": row["path"], "name": row["name"], "error": error})
                progress.update(1)
    except KeyboardInterrupt:
        _fail(f"interrupted: {written} of {len(entries)} results written to {output_dir}", code=130)
    seconds = time.monotonic() - started

    order = {entry.name: entry.line for entry in entries}
    failures.sort(key=lambda failure: order[failure["name"]])
    # seconds: from before the model (and Ray) started to the last result, so startup costs count
    summary = {"manifest": str(manifest), "model": str(model_dir), "ray": ray_address,
               "workers": workers if ray_address is not None else 1, "files_per_call": files_per_call,
               "files": len(entries), "transcribed": written, "failed": failures, "seconds": round(seconds, 3),
               "files_per_minute": round(60 * len(entries) / seconds, 2) if seconds else None}
    summary_path = output_dir / f"{SUMMARY_NAME}.json"
    try:
        _write_atomically(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        click.echo(f"error: cannot write {summary_path}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    click.echo(f"transcribed {written} of {len(entries)} files in {seconds:.1f} s "
               f"({summary['files_per_minute']} files/min); summary: {summary_path}")
    for failure in failures:
        error = failure["error"]  # the runtime's audio errors already begin with the path
        click.echo(f"error: {error}" if error.startswith(failure["path"]) else f"error: {failure['path']}: {error}",
                   err=True)
    if failures:
        sys.exit(1)


def _temperatures(temperature: float, increment) -> tuple:
    if increment is not None and increment > 0:
        import numpy as np

        # np.arange as openai-whisper's CLI (and `runtime transcribe`): the same floats in the JSON
        return tuple(float(t) for t in np.arange(temperature, 1.0 + 1e-6, increment))
    return (temperature,)


def _run_here(entries, files_per_call: int, worker_options: dict):
    """The rows of every entry, transcribed in this process by one Transcriber (one model)."""
    from .ray_jobs import Transcriber

    try:
        transcriber = Transcriber(**worker_options)
    except Exception as exc:  # the runtime's own errors: missing artifacts, a bad option
        _fail(_cause_line(exc))
    for start in range(0, len(entries), files_per_call):
        part = entries[start:start + files_per_call]
        batch = transcriber({"path": [e.path for e in part], "name": [e.name for e in part]})
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _run_on_ray(entries, address: str, workers: int, cpus_per_worker: float, files_per_call: int,
                connect_timeout: float, worker_options: dict):
    """The rows of every entry, as the Ray workers finish them (in no particular order)."""
    from .ray_jobs import RayConnectError, connect, transcribe_dataset

    connected = threading.Event()

    def give_up():  # ray.init cannot be interrupted; a cluster that never answers must not hang the command
        if not connected.wait(connect_timeout):
            sys.stdout.flush()
            sys.stderr.write(f"error: no answer from Ray at {address} within {connect_timeout:g} s\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=give_up, name="ray-connect-watchdog", daemon=True).start()
    try:
        ray = connect(address, timeout=connect_timeout)
    except RayConnectError as exc:
        _fail(str(exc))
    finally:
        connected.set()
    import ray.data

    import logging

    # Ray Data logs each run, and a failed one with its traceback; this command prints a summary and one line
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this command shows its own
    context.print_on_execution_start = False
    dataset = ray.data.from_items([{"path": e.path, "name": e.name} for e in entries],
                                  override_num_blocks=-(-len(entries) // files_per_call))
    options = dict(worker_options)
    results = transcribe_dataset(dataset, options.pop("model_dir"), workers=workers, files_per_call=files_per_call,
                                 cpus_per_worker=cpus_per_worker, **options)
    try:
        for row in results.iter_rows():
            yield {"path": str(row["path"]), "name": str(row["name"]), "result": row["result"], "error": row["error"]}
    except Exception as exc:  # a worker could not start (artifacts, options) or Ray failed
        _fail(_cause_line(exc))
    finally:
        ray.shutdown()  # stops an instance of our own; leaves a cluster's, disconnecting


def _cause_line(exc: BaseException) -> str:
    """One line for what went wrong. Ray's errors carry the worker's traceback as text, whose last line
    is the worker's exception ("runtime.engine.ArtifactError: model folder ... not found")."""
    from .ray_jobs import _one_line

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2:
        return _one_line(exc)
    name, sep, message = lines[-1].partition(": ")
    return message if sep and name.startswith("runtime.") else lines[-1]


def _check_before_starting(model_dir: Path, ray_address, options: dict) -> None:
    """Fail in one line on what every worker would fail on as it starts (Ray would print each worker's
    traceback first): decoding options transcribe_batch refuses, an artifact folder that is not there.
    The folder is looked for here unless the job goes through Ray Client (ray://), whose driver may
    well be a machine without it."""
    from .decoding import DecodingError, DecodingOptions
    from .longform import check_decode_options

    decode_options = {k: v for k, v in options.items()
                      if k in DecodingOptions.__dataclass_fields__ and k != "temperature"}
    try:
        check_decode_options(options["temperature"], decode_options)
    except DecodingError as exc:
        _fail(str(exc))
    if str(ray_address).startswith("ray://"):
        return
    if not (model_dir / "model.json").is_file():
        _fail(f"model folder {model_dir} not found (no model.json); run `make convert` for this model"
              + (" (with --ray the folder must be readable here and on every worker)" if ray_address else ""))


def _prepare_output_dir(output_dir: Path) -> None:
    """Create the output folder and make sure files can be written there, before any work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        _fail(f"cannot write to output folder {output_dir}: {exc.strerror or exc}")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it into place: a reader (or a run
    that was interrupted) sees the whole file or none."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; give it an ordinary file's mode
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)
