"""`runtime serve`: an OpenAI-compatible transcription server (FastAPI on uvicorn) over one loaded model.

    POST /v1/audio/transcriptions   POST /v1/audio/translations   GET /v1/models   GET /health

The multipart fields are OpenAI's (file, model, language, prompt, response_format, temperature,
timestamp_granularities[], stream) plus openai-whisper's keywords (beam_size, best_of,
word_timestamps, condition_on_previous_text, vad_filter, ...; see FIELDS). The defaults are
whisper.transcribe()'s: greedy, the temperature fallback schedule, conditioning on previous text;
`temperature` sets where the schedule starts, as the CLI's --temperature does.

Each request transcribes in a thread of its own through runtime.longform, and every device call
goes through runtime.scheduler, whose running batch of decoder rows takes the windows of concurrent
requests as they come, where that cannot change a token. So a request's result is the one
`runtime.transcribe` gives for that file alone with the same options. At most one request per core
decodes its upload into the log-mel at a time. Load and faults:
- at most --max-batch requests transcribe at once and --max-queue more wait; past that a request
  gets 429 with Retry-After before its upload is read;
- an upload past --max-upload-mb gets 413: by its Content-Length before any of it is read, or as
  soon as a chunked upload passes the limit; its bytes are read off the socket and dropped, never
  stored, so the client receives the answer;
- a client that disconnects has its queued work dropped and its transcription stopped at the next
  window;
- a bad upload (empty, corrupt, not audio) or bad field gets 400 with OpenAI's error JSON, and an
  unexpected failure 500 with it; none of them stops the server or touches another request;
- on SIGTERM/SIGINT uvicorn stops accepting connections and lets the running requests finish.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, imported
# inside create_app so that the CLI does not need FastAPI) as objects
import asyncio
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import click

from .click_types import compute_type_option

logger = logging.getLogger("runtime.serve")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MAX_CANDIDATES = 16  # most beams (beam_size) or samples (best_of) one request may ask for
# bytes of an over-limit upload read off the socket (and dropped) so the client sees the 413; past
# this the connection is simply closed
DRAIN_LIMIT = 256 << 20


class RequestError(Exception):
    """A 4xx answer: OpenAI's error JSON {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 error_type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type, self.headers = error_type, headers or {}


def error_response(exc: RequestError):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


# --- form fields --------------------------------------------------------------------------------

def _text(value: str) -> str:
    return value


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _number(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _optional(convert: Callable) -> Callable:
    def parse(value: str):
        return None if value.strip().lower() in ("", "none", "null") else convert(value)
    return parse


def _integer(value: str) -> int:
    return int(value)


def _json_object(value: str) -> dict:
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object")
    return parsed


# openai-whisper's keywords (and the writers' subtitle options) a request may set, with their parsers
FIELDS: Dict[str, Callable[[str], Any]] = {
    "temperature_increment_on_fallback": _optional(_number),
    "best_of": _optional(_integer), "beam_size": _optional(_integer), "patience": _optional(_number),
    "length_penalty": _optional(_number), "suppress_tokens": _text, "suppress_blank": _boolean,
    "initial_prompt": _text, "carry_initial_prompt": _boolean, "condition_on_previous_text": _boolean,
    "compression_ratio_threshold": _optional(_number), "logprob_threshold": _optional(_number),
    "no_speech_threshold": _optional(_number), "without_timestamps": _boolean,
    "max_initial_timestamp": _optional(_number), "sample_len": _optional(_integer), "prefix": _text,
    "clip_timestamps": _text, "word_timestamps": _boolean, "prepend_punctuations": _text,
    "append_punctuations": _text, "hallucination_silence_threshold": _optional(_number),
    "batch_windows": _integer, "vad_filter": _boolean, "vad_parameters": _json_object, "fp16": _boolean,
    "highlight_words": _boolean, "max_line_width": _optional(_integer), "max_line_count": _optional(_integer),
    "max_words_per_line": _optional(_integer),
}
OPENAI_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature",
                 "timestamp_granularities[]", "timestamp_granularities", "stream")


@dataclass
class ParsedRequest:
    options: Any  # runtime.options.TranscribeOptions
    response_format: str
    stream: bool
    words: bool  # word timestamps asked for through timestamp_granularities[]
    writer_options: dict


def parse_fields(form, task: str) -> ParsedRequest:
    """The request's transcription options from its form fields; RequestError (400) for a bad one."""
    from runtime.options import SUBTITLE_OPTIONS, OptionsError, TranscribeOptions, check_subtitle_options, \
        temperature_schedule

    names = set(form.keys())
    unknown = sorted(names - set(FIELDS) - set(OPENAI_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}: this server takes OpenAI's fields and "
                                f"openai-whisper's transcribe keywords", param=unknown[0])
    for name in names:
        if name not in ("timestamp_granularities[]", "timestamp_granularities") and len(form.getlist(name)) > 1:
            raise RequestError(400, f"field {name!r} is given more than once", param=name)
        if name != "file" and not isinstance(form.get(name), str):
            raise RequestError(400, f"field {name!r} must be a value, not a file", param=name)

    def value(name: str, parse: Callable, default=None):
        if name not in form:
            return default
        try:
            return parse(form[name])
        except (TypeError, ValueError) as exc:
            raise RequestError(400, f"{name}: cannot read {form[name]!r} ({exc})", param=name) from None

    response_format = value("response_format", _text, "json")
    if response_format not in RESPONSE_FORMATS:
        raise RequestError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                                f"got {response_format!r}", param="response_format")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for granularity in granularities:
        if granularity not in ("word", "segment"):
            raise RequestError(400, f"timestamp_granularities[] takes word and segment, got {granularity!r}",
                               param="timestamp_granularities[]")
    stream = value("stream", _boolean, False)

    options: Dict[str, Any] = {"task": task, "verbose": None}
    language = value("language", _text)
    if language:
        options["language"] = language
    prompt = value("prompt", _text)
    if prompt and "initial_prompt" in form:
        raise RequestError(400, "prompt and initial_prompt are the same option: give one", param="prompt")
    if prompt:
        options["initial_prompt"] = prompt
    extra = {name: value(name, parse) for name, parse in FIELDS.items() if name in form}
    # one request must not take the machine: candidates and beams are rows of its own device batch
    for name in ("best_of", "beam_size"):
        if extra.get(name) is not None and not 1 <= extra[name] <= MAX_CANDIDATES:
            raise RequestError(400, f"{name} must be between 1 and {MAX_CANDIDATES} on this server, "
                                    f"got {extra[name]}", param=name)
    writer_options = {name: extra.pop(name) for name in SUBTITLE_OPTIONS if name in extra}
    increment = extra.pop("temperature_increment_on_fallback", 0.2)
    options.update(extra)
    if "word" in granularities:
        options["word_timestamps"] = True
    try:
        if "temperature" in form or "temperature_increment_on_fallback" in form:
            options["temperature"] = temperature_schedule(value("temperature", _number, 0.0), increment)
        parsed = TranscribeOptions.from_kwargs(**options)
        check_subtitle_options(parsed.word_timestamps, parsed.hallucination_silence_threshold, writer_options)
    except OptionsError as exc:
        raise RequestError(400, str(exc), param=exc.param) from None
    return ParsedRequest(parsed, response_format, stream, "word" in granularities, writer_options)


# --- responses ----------------------------------------------------------------------------------

SEGMENT_FIELDS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                  "compression_ratio", "no_speech_prob")


def verbose_segment(segment: dict) -> dict:
    return {name: segment[name] for name in SEGMENT_FIELDS}


def render(result: dict, info, request: ParsedRequest):
    """The response body of a finished transcription, in the asked-for format."""
    from fastapi.responses import JSONResponse, PlainTextResponse

    from runtime.tokenizer import LANGUAGES
    from runtime.writers import render_srt, render_txt, render_vtt

    fmt = request.response_format
    if fmt == "json":
        return JSONResponse({"text": result["text"]})
    if fmt in ("text", "srt", "vtt"):
        # the same bytes as the CLI's txt/srt/vtt files
        text = {"text": render_txt, "srt": render_srt, "vtt": render_vtt}[fmt](result, request.writer_options)
        return PlainTextResponse(text, media_type="text/vtt" if fmt == "vtt" else "text/plain")
    body = {"task": info.options.task, "language": LANGUAGES.get(result["language"], result["language"]),
            "duration": info.duration, "text": result["text"],
            "segments": [verbose_segment(s) for s in result["segments"]]}
    if request.words or info.options.word_timestamps:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"], "probability": w["probability"]}
                         for s in result["segments"] for w in s.get("words", [])]
    return JSONResponse(body)


def sse(data: dict, event: Optional[str] = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


# --- the server ---------------------------------------------------------------------------------

@dataclass
class Stats:
    running: int = 0  # admitted and not finished: transcribing or waiting for a thread
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0  # 429
    failed: int = 0  # 4xx/5xx after admission
    lock: threading.Lock = field(default_factory=threading.Lock)


class Server:
    """The state one app serves from: the model, the scheduler, the request threads and the counters."""

    def __init__(self, model, model_id: str, *, max_batch: int = 8, max_queue: int = 32,
                 max_upload_bytes: int = 100 << 20):
        from runtime.scheduler import Scheduler

        self.model = model
        self.model_id = model_id
        self.max_batch = max_batch
        self.capacity = max_batch + max_queue
        self.max_upload_bytes = max_upload_bytes
        self.scheduler = Scheduler(model, max_batch=max_batch)
        self.threads = ThreadPoolExecutor(max_workers=max_batch, thread_name_prefix="runtime-request")
        # Requests that arrive together would each decode their upload and make its log-mel at once
        # (about 25 MB each while it runs, all competing for the same cores): at most one per core
        # does, the others wait their turn with their upload on disk.
        self.preparing = threading.BoundedSemaphore(max(1, min(max_batch, len(os.sched_getaffinity(0))
                                                               if hasattr(os, "sched_getaffinity") else 2)))
        self.stats = Stats()
        self.started = int(time.time())

    def admit(self) -> bool:
        with self.stats.lock:
            if self.stats.running >= self.capacity:
                self.stats.rejected += 1
                return False
            self.stats.running += 1
            return True

    def release(self, outcome: str) -> None:
        with self.stats.lock:
            self.stats.running -= 1
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.scheduler.close()


TOO_LARGE = "runtime.upload_too_large"  # set in the ASGI scope when an upload passed the limit


def too_large(limit: int) -> RequestError:
    return RequestError(413, f"the upload is larger than this server's limit of {limit / (1 << 20):g} MB "
                             "(--max-upload-mb)", param="file", code="upload_too_large")


class UploadLimit:
    """ASGI middleware: 413 for an upload past the limit, decided before the app reads it whole."""

    def __init__(self, app, max_bytes_of: Callable[[], int]):
        self.app = app
        self.max_bytes_of = max_bytes_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_bytes_of()
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(receive, send, limit, 0)

        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] != "http.request" or scope.get(TOO_LARGE):
                return message
            seen += len(message.get("body", b""))
            if seen <= limit:
                return message
            # past the limit: read the rest off the socket and drop it (so the client, still sending,
            # receives the 413), and end the body here; the app answers 413 (handle, below)
            scope[TOO_LARGE] = True
            more, drained = message.get("more_body", False), seen
            while more and drained < DRAIN_LIMIT:
                message = await receive()
                if message["type"] != "http.request":
                    return message  # the client went away
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            return {"type": "http.request", "body": b"", "more_body": False}

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _refuse(receive, send, limit: int, seen: int, more: bool = True) -> None:
        """413 without calling the app, for an upload whose Content-Length is past the limit."""
        # read the rest off the socket and drop it, so the client, still sending, receives the answer
        drained = seen
        while more and drained < DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        error = too_large(limit)
        body = json.dumps({"error": {"message": error.message, "type": error.error_type, "param": error.param,
                                     "code": error.code}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let the running requests finish; stop the threads and the scheduler
        await asyncio.get_running_loop().run_in_executor(None, server.close)

    app = FastAPI(title="whisper-max", lifespan=lifespan)

    @app.get("/health")
    async def health():
        s = server.stats
        return {"status": "ok", "model": server.model_id, "running": s.running, "capacity": server.capacity,
                "completed": s.completed, "cancelled": s.cancelled, "rejected": s.rejected, "failed": s.failed,
                "decoder_steps": server.scheduler.steps, "row_steps": server.scheduler.row_steps,
                "batched_windows": server.scheduler.windows, "largest_batch": server.scheduler.largest_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.started,
                                            "owned_by": "whisper-max"}]}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await handle(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await handle(request, "translate")

    async def handle(request: Request, task: str):
        from fastapi.responses import Response

        if not server.admit():
            return error_response(RequestError(
                429, f"the server is busy ({server.capacity} requests running or queued); retry later",
                code="queue_full", error_type="rate_limit_error", headers={"Retry-After": "1"}))
        job: Optional[_Job] = None
        outcome = "failed"
        try:
            try:
                form = await request.form(max_files=1, max_fields=64)
            except Exception as exc:  # a disconnect, a malformed (or cut off) multipart body
                from starlette.requests import ClientDisconnect

                if request.scope.get(TOO_LARGE):
                    raise too_large(server.max_upload_bytes) from None
                if isinstance(exc, ClientDisconnect):
                    outcome = "cancelled"
                    return Response(status_code=499)
                raise RequestError(400, f"cannot read the multipart form ({exc})") from None
            if request.scope.get(TOO_LARGE):
                raise too_large(server.max_upload_bytes)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "no audio: send the audio file in the 'file' field", param="file")
            parsed = parse_fields(form, task)
            job = _Job(asyncio.get_running_loop(), parsed, server)
            server.threads.submit(job.run, upload.file)  # from here on the job's thread releases the slot
            kind, payload = await job.next(request)  # the audio is read and the language known, or an error
            if kind == "error":
                return error_response(payload) if payload is not None else Response(status_code=499)
            info = payload
            if parsed.stream:
                return StreamingResponse(stream(job, info), media_type="text/event-stream")
            while True:
                kind, payload = await job.next(request)
                if kind == "done":
                    return render(payload, info, parsed)
                if kind == "error":
                    return error_response(payload) if payload is not None else Response(status_code=499)
        except RequestError as exc:
            return error_response(exc)
        finally:
            if job is None:
                server.release(outcome)
            elif not parsed.stream:
                job.cancel.set()  # a no-op when it has finished; stops it when the client went away

    async def stream(job: "_Job", info):
        # Starlette cancels this generator when the client disconnects: the finally stops the job
        try:
            while True:
                kind, payload = await job.next(None)
                if kind == "segment":
                    yield sse({"type": "transcript.text.delta", "delta": payload["text"],
                               "segment": verbose_segment(payload)})
                elif kind == "done":
                    yield sse({"type": "transcript.text.done", "text": payload["text"],
                               "language": payload["language"], "duration": info.duration})
                    return
                else:
                    if payload is not None:
                        yield sse({"error": {"message": payload.message, "type": payload.error_type,
                                             "param": payload.param, "code": payload.code}}, event="error")
                    return
        finally:
            job.cancel.set()

    return app


class _Job:
    """One request's transcription: runs in a request thread, reports to the event loop through a
    queue: ("info", TranscriptionInfo), ("segment", dict)..., then ("done", result) or ("error",
    RequestError, or None when cancelled). The thread releases the request's admission slot."""

    def __init__(self, loop, parsed: ParsedRequest, server: Server):
        self.loop = loop
        self.parsed = parsed
        self.server = server
        self.cancel = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def run(self, upload) -> None:
        from runtime.api import start_transcription
        from runtime.audio import AudioError
        from runtime.decoding import DecodingError
        from runtime.options import OptionsError
        from runtime.scheduler import Cancelled, ScheduledModel
        from runtime.tokenizer import TokenizerError

        outcome, last = "failed", None
        try:
            if self.cancel.is_set():
                raise Cancelled()
            model = ScheduledModel(self.server.scheduler, self.cancel)
            try:
                # the upload (spooled to disk) is decoded block by block into the log-mel, which is kept
                # on disk past a few minutes (runtime.longform): a long upload is never in memory whole
                with self.server.preparing:
                    if self.cancel.is_set():
                        raise Cancelled()
                    transcription = start_transcription(model, upload, self.parsed.options, decode_fn=model.decode)
            except AudioError as exc:
                message = str(exc).split(": ", 1)[-1]
                raise RequestError(400, f"the file is not audio this server can decode: {message}",
                                   param="file") from None
            except OptionsError as exc:
                raise RequestError(400, str(exc), param=exc.param) from None
            except (DecodingError, TokenizerError) as exc:  # e.g. a language the model does not know
                raise RequestError(400, str(exc), param="language" if "language" in str(exc) else None) from None
            self._put(("info", transcription.info))
            try:
                for segment in transcription:
                    self._put(("segment", segment))
                    if self.cancel.is_set():
                        raise Cancelled()
                result = transcription.result()
            finally:
                transcription.close()
            outcome, last = "completed", ("done", result)
        except Cancelled:
            outcome, last = "cancelled", ("error", None)
        except RequestError as exc:
            last = ("error", exc)
        except Exception as exc:  # a bug: this request fails, the server goes on
            logger.exception("transcription failed")
            last = ("error", RequestError(500, f"internal error: {type(exc).__name__}: {exc}",
                                          error_type="server_error"))
        finally:
            # the place is free before the answer goes out: a client may send its next request at once
            self.server.release(outcome)
            self._put(last or ("error", RequestError(500, "internal error", error_type="server_error")))

    async def next(self, request):
        """The next (kind, payload) from the thread; cancels the job when the client of `request` disconnects."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.2)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel.set()


# --- the command --------------------------------------------------------------------------------

@click.command("serve")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="artifact folder made by make convert and make compile, e.g. artifacts/tiny")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@compute_type_option
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="pin this server process to N CPUs (MAX sizes its thread pool from them); 0 leaves it alone")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="requests transcribed at once, and windows decoded in one device batch")
@click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True,
              help="requests waiting beyond --max-batch before new ones get 429")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="largest upload accepted; larger ones get 413")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_command(model_dir, host, port, device, compute_type, threads, max_batch, max_queue, max_upload_mb, log_level) -> None:
    """Serve OpenAI's /v1/audio/transcriptions and /v1/audio/translations from prebuilt artifacts."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        _fail(f"runtime serve needs the serve extra ({exc.name} is missing): pip install -e '.[serve]'")
    from runtime.api import load_model
    from runtime.engine import ArtifactError

    try:
        model = load_model(model_dir, device=device, threads=threads or None, compute_type=compute_type)
    except ArtifactError as exc:
        _fail(str(exc))
    server = Server(model, Path(model_dir).name, max_batch=max_batch, max_queue=max_queue,
                    max_upload_bytes=int(max_upload_mb * (1 << 20)))
    app = UploadLimit(create_app(server), lambda: server.max_upload_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    uvicorn_server = uvicorn.Server(config)
    try:
        uvicorn_server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it stopped on, after its graceful shutdown
        pass
    except OSError as exc:  # e.g. the host is not an address of this machine
        _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}")
    if not uvicorn_server.started:  # uvicorn said why (e.g. the port is taken)
        raise SystemExit(1)


def _fail(message: str) -> None:
    """One line on stderr and exit 1, as the other runtime commands do."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    raise SystemExit(1)
