"""`runtime serve`: OpenAI's audio endpoints, spoken to with the official `openai` client.

Every result is compared with `runtime.transcribe` on the same file and options (the CLI's path), token
for token. The random-weight model decodes up to its token limit, so requests ask for short windows
(`sample_len`) and no temperature fallback to keep the file to a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from audio_samples import synthesize_speech  # noqa: E402
from conftest import BIN  # noqa: E402

SAMPLE_LEN = 8
# what every request sends besides the file, and the same as runtime.transcribe keywords
FIELDS = {"sample_len": SAMPLE_LEN, "temperature_increment_on_fallback": "none"}
OPTIONS = dict(language="en", temperature=0.0, sample_len=SAMPLE_LEN, verbose=None)
STARTUP_GUARD_S = 300  # a hang guard, not a timing assertion: a cold model load on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model_dir: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODULAR_LOG_LEVEL": "error"}
        self.log = open(log, "w")
        self.process = subprocess.Popen([str(BIN / "runtime"), "serve", "--model", str(model_dir), "--host",
                                         "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *args],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.monotonic() + STARTUP_GUARD_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"runtime serve exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"runtime serve did not start:\n{log.read_text()}")
            time.sleep(0.5)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=30).json()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    running = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log",
                            "--max-batch", "8", "--max-queue", "16", "--max-upload-mb", "2")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Four different short recordings (one window each) and one of two windows."""
    folder = tmp_path_factory.mktemp("serve-audio")
    return [synthesize_speech(folder / f"speech-{n}.wav", n_sentences=n) for n in (1, 2, 3, 4, 7)]


def transcribe(client, path: Path, **kwargs):
    extra = dict(FIELDS, **kwargs.pop("extra_body", {}))
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, language="en", extra_body=extra,
                                                  **kwargs)


def reference(tiny_runtime, path: Path, **options) -> dict:
    import runtime

    return runtime.transcribe(tiny_runtime, path, **{**OPTIONS, **options})


def as_dict(response) -> dict:
    return response.model_dump() if hasattr(response, "model_dump") else json.loads(response)


def test_models_and_health(server, tiny_model_dir):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [tiny_model_dir.name]
    assert server.health()["status"] == "ok"


def test_response_formats_equal_the_clis(server, tiny_runtime, clips, tmp_path):
    """json is {"text"}; text, srt and vtt are the bytes of the CLI's txt, srt and vtt files; verbose_json
    has OpenAI's fields and runtime.transcribe's segments."""
    from runtime.tokenizer import LANGUAGES
    from runtime.writers import get_writer

    client = server.client()
    path = clips[1]
    expected = reference(tiny_runtime, path)
    assert expected["segments"], expected
    for fmt in ("txt", "srt", "vtt"):
        get_writer(fmt, str(tmp_path))(expected, str(path), {})

    assert as_dict(transcribe(client, path, response_format="json"))["text"] == expected["text"]
    for fmt, suffix in (("text", "txt"), ("srt", "srt"), ("vtt", "vtt")):
        body = transcribe(client, path, response_format=fmt)
        assert isinstance(body, str)
        assert body.encode("utf-8") == (tmp_path / f"{path.stem}.{suffix}").read_bytes(), fmt

    verbose = as_dict(transcribe(client, path, response_format="verbose_json"))
    assert verbose["task"] == "transcribe" and verbose["language"] == LANGUAGES["en"]
    assert verbose["duration"] == pytest.approx(len(_samples(path)) / 16000, abs=0.01)
    assert verbose["text"] == expected["text"]
    keys = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
            "no_speech_prob"}
    assert [set(s) for s in verbose["segments"]] == [keys] * len(expected["segments"])
    assert verbose["segments"] == [{k: s[k] for k in keys} for s in expected["segments"]]
    assert not verbose.get("words")


def _samples(path: Path):
    from runtime.audio import load_audio

    return load_audio(path)


def test_word_timestamps(server, tiny_runtime, clips):
    expected = reference(tiny_runtime, clips[2], word_timestamps=True)
    words = [w for s in expected["segments"] for w in s["words"]]
    assert words, expected
    verbose = as_dict(transcribe(server.client(), clips[2], response_format="verbose_json",
                                 timestamp_granularities=["word"]))
    assert [(w["word"], w["start"], w["end"]) for w in verbose["words"]] == \
        [(w["word"], w["start"], w["end"]) for w in words]
    assert [s["tokens"] for s in verbose["segments"]] == [s["tokens"] for s in expected["segments"]]


def test_language_detected_as_transcribe_does(server, tiny_runtime, clips):
    from runtime.tokenizer import LANGUAGES

    options = {k: v for k, v in OPTIONS.items() if k != "language"}
    import runtime

    expected = runtime.transcribe(tiny_runtime, clips[1], **options)
    with open(clips[1], "rb") as f:
        verbose = as_dict(server.client().audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", extra_body=FIELDS))
    assert verbose["language"] == LANGUAGES[expected["language"]]
    assert [s["tokens"] for s in verbose["segments"]] == [s["tokens"] for s in expected["segments"]]


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client marks translations so
def test_translation(server, tiny_runtime, clips):
    expected = reference(tiny_runtime, clips[0], task="translate")
    with open(clips[0], "rb") as f:
        verbose = as_dict(server.client().audio.translations.create(
            model="whisper-1", file=f, response_format="verbose_json", extra_body=dict(FIELDS, language="en")))
    assert verbose["task"] == "translate"
    assert [s["tokens"] for s in verbose["segments"]] == [s["tokens"] for s in expected["segments"]]
    assert verbose["text"] == expected["text"]


def test_extra_whisper_fields(server, tiny_runtime, clips):
    """openai-whisper's keywords as extra form fields: beam search, no conditioning, a prompt."""
    options = dict(beam_size=3, condition_on_previous_text=False)
    expected = reference(tiny_runtime, clips[4], initial_prompt="Trains and bread.", **options)
    verbose = as_dict(transcribe(server.client(), clips[4], response_format="verbose_json",
                                 prompt="Trains and bread.", extra_body=options))
    assert [s["tokens"] for s in verbose["segments"]] == [s["tokens"] for s in expected["segments"]]
    assert max(s["seek"] for s in verbose["segments"]) > 0, "two windows expected"


def test_stream_sends_each_segment(server, tiny_runtime, clips):
    expected = reference(tiny_runtime, clips[4])
    events = list(transcribe(server.client(), clips[4], stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events] == ["transcript.text.delta"] * len(deltas) + ["transcript.text.done"]
    segments = [e.model_dump()["segment"] for e in deltas]
    assert [s["tokens"] for s in segments] == [s["tokens"] for s in expected["segments"]]
    assert [(s["start"], s["end"]) for s in segments] == [(s["start"], s["end"]) for s in expected["segments"]]
    assert events[-1].text == expected["text"]


def test_concurrent_requests_equal_transcribing_alone(server, tiny_runtime, clips):
    """16 requests at once over five recordings (one of two windows): each gets the tokens that
    runtime.transcribe gives for its file alone, while their windows share device batches."""
    expected = {path: reference(tiny_runtime, path) for path in clips}
    before = server.health()
    client = server.client(timeout=600)
    paths = [clips[i % len(clips)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: as_dict(transcribe(client, p, response_format="verbose_json")), paths))
    for path, response in zip(paths, responses):
        assert [s["tokens"] for s in response["segments"]] == [s["tokens"] for s in expected[path]["segments"]], path
        assert [(s["start"], s["end"]) for s in response["segments"]] == \
            [(s["start"], s["end"]) for s in expected[path]["segments"]]
        assert response["text"] == expected[path]["text"]
    after = server.health()
    assert after["completed"] - before["completed"] == 16
    # 16 requests in flight: their windows were rows of the running batch, several per step
    assert after["largest_batch"] > 1
    assert after["batched_windows"] - before["batched_windows"] >= 16
    assert after["row_steps"] - before["row_steps"] > 2 * (after["decoder_steps"] - before["decoder_steps"])


@pytest.mark.parametrize("content", [b"", b"\x00\x01 definitely not audio " * 64], ids=["empty", "garbage"])
def test_bad_audio_is_400_with_openais_error(server, content):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().audio.transcriptions.create(model="whisper-1", file=("bad.wav", content))
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "file" and error["type"] == "invalid_request_error" and error["message"]
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("fields,param", [
    ({"beam_size": 0}, "beam_size"),
    ({"clip_timestamps": "5,2"}, "clip_timestamps"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"response_format": "xml"}, "response_format"),
    ({"best_of": 100000, "temperature": 0.5}, "best_of"),
])
def test_bad_fields_are_400(server, clips, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(server.client(), clips[0], extra_body=fields)
    assert caught.value.response.json()["error"]["param"] == param


def test_oversized_upload_is_413(server, clips):
    import httpx

    big = os.urandom(3 << 20)  # past --max-upload-mb 2
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().audio.transcriptions.create(model="whisper-1", file=("big.wav", big))
    assert caught.value.status_code == 413
    assert caught.value.response.json()["error"]["param"] == "file"

    def chunks():  # no Content-Length: refused once the count passes the limit
        head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
                b"Content-Type: audio/wav\r\n\r\n")
        yield head
        for _ in range(12):
            yield os.urandom(256 << 10)
        yield b"\r\n--b--\r\n"

    response = httpx.post(f"{server.url}/v1/audio/transcriptions", content=chunks(),
                          headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=120)
    assert response.status_code == 413 and response.json()["error"]["code"] == "upload_too_large"
    assert server.health()["status"] == "ok"


def test_disconnected_client_has_its_work_dropped(server, clips):
    before = server.health()
    body, content_type = _multipart(clips[4], {"language": "en", "sample_len": "64",
                                                "temperature_increment_on_fallback": "none"})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_request_head(len(body), content_type) + body)
        _wait_for(lambda: server.health()["running"] > before["running"])
    _wait_for(lambda: server.health()["running"] == before["running"])
    after = server.health()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_full_queue_is_429_with_retry_after(tiny_model_dir, clips, tmp_path):
    """--max-batch 1 --max-queue 0: a request still uploading holds the only place."""
    busy = RunningServer(tiny_model_dir, tmp_path / "serve.log", "--max-batch", "1", "--max-queue", "0")
    try:
        body, content_type = _multipart(clips[0], {"language": "en", **{k: str(v) for k, v in FIELDS.items()}})
        with socket.create_connection(("127.0.0.1", busy.port)) as sock:
            sock.sendall(_request_head(len(body), content_type) + body[:100])
            _wait_for(lambda: busy.health()["running"] == 1)
            with pytest.raises(openai.RateLimitError) as caught:
                transcribe(busy.client(), clips[0])
            assert caught.value.response.headers["retry-after"] == "1"
            assert caught.value.response.json()["error"]["code"] == "queue_full"
            sock.sendall(body[100:])
            reply = _read_response(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert transcribe(busy.client(), clips[0]).text == json.loads(reply.split(b"\r\n\r\n", 1)[1])["text"]
        assert busy.health()["rejected"] == 1
    finally:
        assert busy.stop() == 0


def test_graceful_shutdown_finishes_running_requests(tiny_model_dir, tiny_runtime, clips, tmp_path):
    running = RunningServer(tiny_model_dir, tmp_path / "serve.log")
    try:
        events = transcribe(running.client(), clips[4], stream=True)
        first = next(iter(events))
        assert first.type == "transcript.text.delta"
        running.process.send_signal(signal.SIGTERM)  # while the second window is still to decode
        rest = list(events)
    finally:
        code = running.stop()
    assert rest and rest[-1].type == "transcript.text.done"
    assert rest[-1].text == reference(tiny_runtime, clips[4])["text"]
    # uvicorn re-raises the signal once it has shut down gracefully: the process ends as SIGTERM ends one
    assert code in (0, -signal.SIGTERM)


# --- raw HTTP, for what a well-behaved client does not do -------------------------------------------

def _multipart(path: Path, fields: dict) -> tuple[bytes, str]:
    boundary = "whisper-max-test"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _request_head(length: int, content_type: str) -> bytes:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def _read_response(sock) -> bytes:
    chunks = []
    while block := sock.recv(65536):
        chunks.append(block)
    return b"".join(chunks)


def _wait_for(condition, guard_s: float = 300) -> None:
    """Poll until `condition()` holds; the guard only stops a hang (it is not what is tested)."""
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.1)


# --- long uploads: decoded block by block ------------------------------------------------------------

def test_upload_transcribes_as_its_samples_do(server, tiny_runtime, clips):
    """The server decodes an upload block by block into its log-Mel (runtime.audio.SpooledLogMel) instead of
    holding the samples: the answer is runtime.transcribe's on the file's samples given in memory (the
    one-piece log-Mel)."""
    import runtime
    from runtime.audio import load_audio

    expected = runtime.transcribe(tiny_runtime, load_audio(clips[4]), **OPTIONS)
    verbose = as_dict(transcribe(server.client(), clips[4], response_format="verbose_json"))
    assert [s["tokens"] for s in verbose["segments"]] == [s["tokens"] for s in expected["segments"]]
    assert [(s["start"], s["end"]) for s in verbose["segments"]] == \
        [(s["start"], s["end"]) for s in expected["segments"]]
    assert max(s["seek"] for s in verbose["segments"]) > 0, "two windows expected"


def test_log_mel_kept_on_disk_transcribes_alike(tiny_runtime, clips, monkeypatch):
    """A file's log-Mel past runtime.audio.MEL_IN_MEMORY_BYTES goes to a temporary file (here: any file's);
    every window read back from it gives the tokens and times of the samples transcribed in memory."""
    import runtime
    import runtime.audio
    import runtime.longform
    from runtime.audio import load_audio

    made = []

    class Recorded(runtime.audio.SpooledLogMel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.in_memory)

    monkeypatch.setattr(runtime.audio, "MEL_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(runtime.longform, "SpooledLogMel", Recorded)
    options = dict(OPTIONS, condition_on_previous_text=False, word_timestamps=True)
    expected = runtime.transcribe(tiny_runtime, load_audio(clips[4]), **options)
    assert expected["segments"]
    with open(clips[4], "rb") as f:
        for source in (clips[4], f):
            assert runtime.transcribe(tiny_runtime, source, **options) == expected
    assert made == [False, False]
