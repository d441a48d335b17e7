"""One timed transcription in a fresh process: `python -m bench.driver SPEC.json`.

Runs under this project's venv (impl "max", "max-batched", "max-int8", "max-int8-batched") or the peers' venv ("openai",
"faster-whisper"), so it imports only the standard library at the top and bench.stats (itself
standard library only). The same measurement hooks for every implementation, patched into this
process only:

- per decoding window: wall time of the window's decode call, the encoder's share of it, and the
  number of decoded tokens (one per decoder call: the prefill gives the first, each step one more;
  faster-whisper decodes inside CTranslate2, so its count is the length of the generated sequence);
- the wall-clock time (time.time()) of the first decoded token, for cold start: the parent passes
  the time just before it launched this process. faster-whisper gives no per-token hook, so its
  first token is estimated as the start of the first window's generate plus one average token of it.

The result is written as JSON to spec["result_path"]; stdout and stderr are only a log.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from bench.stats import temperatures_by_window, tokens_by_window


class Recorder:
    """Collects the per-window figures. A window opens when a decode call starts."""

    def __init__(self):
        self.windows = []
        self.current = None
        self.first_token_time = None
        self.first_token_estimated = False
        self.total_tokens = 0

    def open_window(self):
        self.current = {"encode_s": 0.0, "n_encode": 0, "tokens": 0, "wall_s": 0.0}
        self.windows.append(self.current)
        return time.perf_counter()

    def close_window(self, t0, n_tokens=None):
        w = self.current
        w["wall_s"] = time.perf_counter() - t0
        if n_tokens is not None:
            w["tokens"] = n_tokens
        w["decode_s"] = w["wall_s"] - w["encode_s"]
        self.current = None

    def encoder(self, seconds):
        w = self.current
        if w is None:  # outside a decode call (faster-whisper, a batched runtime ...): a window of its own
            w = {"encode_s": 0.0, "n_encode": 0, "tokens": 0, "wall_s": 0.0, "outside_decode": True}
            self.windows.append(w)
        w["encode_s"] += seconds
        w["n_encode"] += 1

    def token(self, n=1):
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.total_tokens += n
        if self.current is not None:
            self.current["tokens"] += n

    def summary(self):
        windows = [w for w in self.windows if not w.get("outside_decode")]
        enc = [w["encode_s"] for w in self.windows if w["n_encode"]]
        return {
            "windows": self.windows,
            "n_windows": len(windows),
            "n_tokens": self.total_tokens,
            "decode_s": sum(w.get("decode_s", 0.0) for w in windows),
            "encode_s_per_window": enc,
            "first_token_time": self.first_token_time,
            "first_token_estimated": self.first_token_estimated,
        }


def batch_rows(tokens):
    """Sequences advanced by one decoder call: a call decodes one token for each row of its batch."""
    try:
        return max(1, len(tokens))
    except TypeError:
        return 1


def recorded(rec, fn):
    """fn, each call one window of `rec` (a decode call: one window, or a batch of them)."""
    def wrapper(*args, **kwargs):
        t0 = rec.open_window()
        try:
            return fn(*args, **kwargs)
        finally:
            rec.close_window(t0)
    return wrapper


# --- implementations ------------------------------------------------------------------------

def run_max(spec, rec):
    import importlib
    import pkgutil

    import runtime
    import runtime.decoding as decoding

    transcribe_fn = runtime.transcribe
    # the long-form loop is imported lazily by runtime.transcribe: import the package's modules now,
    # so that every binding of decoding.decode (one call per window) can be wrapped below
    for info in pkgutil.iter_modules(runtime.__path__):
        if info.name not in ("cli", "__main__"):
            try:
                importlib.import_module(f"runtime.{info.name}")
            except Exception:
                pass
    if not callable(transcribe_fn):  # a submodule named like the API function would shadow it
        transcribe_fn = runtime.api.transcribe

    versions = {"max": _version("max"), "numpy": _version("numpy")}
    t = time.perf_counter()
    model = runtime.load_model(spec["model"], device=spec.get("device", "cpu"), threads=spec["threads"],
                               compute_type=spec.get("compute_type", "exact"))
    load_s = time.perf_counter() - t

    # the runtime.inference protocol, wrapped on this instance: encode(mel) once per window,
    # decoder(features) -> a session whose prefill gives the first token and each step one more
    orig_encode, orig_decoder = model.encode, model.decoder

    def encode(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig_encode(*args, **kwargs)
        rec.encoder(time.perf_counter() - t0)
        return out

    class CountedSession:
        """The session, counting the tokens its prefill and steps decode. A wrapper rather than
        wrapped methods set on the session: those would make a reference cycle that keeps every
        window's session (its caches and the audio's keys and values) alive until the garbage
        collector runs, and the peak memory measured would be the bench's, not the runtime's."""

        def __init__(self, session):
            self._session = session

        def prefill(self, tokens, *args, **kwargs):
            out = self._session.prefill(tokens, *args, **kwargs)
            rec.token(batch_rows(tokens))
            return out

        def step(self, tokens, *args, **kwargs):
            out = self._session.step(tokens, *args, **kwargs)
            rec.token(batch_rows(tokens))
            return out

        def __getattr__(self, name):
            return getattr(self._session, name)

    def decoder(*args, **kwargs):
        return CountedSession(orig_decoder(*args, **kwargs))

    class CountedRows:
        """A running batch of rows (runtime.continuous), counting the tokens its joins and steps decode."""

        def __init__(self, rows):
            self._rows = rows

        def join(self, *args, **kwargs):
            out = self._rows.join(*args, **kwargs)
            rec.token(1)
            return out

        def step(self, tokens, *args, **kwargs):
            out = self._rows.step(tokens, *args, **kwargs)
            rec.token(batch_rows(tokens))
            return out

        def __len__(self):
            return len(self._rows)

        def __getattr__(self, name):
            return getattr(self._rows, name)

    model.encode = encode
    model.decoder = decoder
    if hasattr(model, "row_batch"):
        orig_row_batch = model.row_batch
        model.row_batch = lambda *args, **kwargs: CountedRows(orig_row_batch(*args, **kwargs))
    # decode: a window or a batch of them; decode_windows: the windows of a running batch
    orig_decode = decoding.decode
    decode = recorded(rec, orig_decode)
    orig_decode_windows = getattr(sys.modules.get("runtime.continuous"), "decode_windows", None)
    decode_windows = recorded(rec, orig_decode_windows)

    for name, module in list(sys.modules.items()):
        if name == "runtime" or name.startswith("runtime."):
            if getattr(module, "decode", None) is orig_decode:
                module.decode = decode
            if orig_decode_windows is not None and getattr(module, "decode_windows", None) is orig_decode_windows:
                module.decode_windows = decode_windows

    opts = dict(spec["options"])
    if spec["impl"] == "max-sequential":
        opts["batch_windows"] = 1  # one window at a time, as openai-whisper decodes
    eot = _max_eot(model)
    if spec["impl"] in ("max-batched", "max-int8-batched"):
        # the random workload: batch_size copies of the audio (decoder batch: the default); the real
        # workloads: spec["audios"], decode_batch_size chunks per decoder batch
        paths = spec.get("audios") or [spec["audio"]] * spec.get("batch_size", 1)
        if spec.get("decode_batch_size"):
            opts["batch_size"] = spec["decode_batch_size"]
        t0 = time.perf_counter()
        results = runtime.transcribe_batch(model, paths, **opts)
        wall = time.perf_counter() - t0
        results = list(results)
    else:
        paths = spec.get("audios") or [spec["audio"]]
        t0 = time.perf_counter()
        results = [transcribe_fn(model, path, **opts) for path in paths]  # one file after the other
        wall = time.perf_counter() - t0
    return dict(wall_s=wall, load_s=load_s, eot=eot, n_audio=len(paths), versions=versions,
                **_transcripts(results, eot))


def _transcripts(results, eot):
    """Text token ids and temperatures by window, and the text, of one or more files' results in order.
    Segments are dicts or objects with the same fields (faster-whisper's)."""
    tokens, temps, texts = [], [], []
    for r in results:
        segs = [s if isinstance(s, dict) else {"seek": s.seek, "tokens": s.tokens, "temperature": s.temperature,
                                               "text": s.text} for s in r["segments"]]
        tokens += tokens_by_window(segs, eot)
        temps += temperatures_by_window(segs)
        texts.append(r["text"] if r.get("text") is not None else "".join(s["text"] for s in segs))
    text = "\n".join(t.strip() for t in texts)
    return dict(tokens_by_window=tokens, temperatures_by_window=temps, text=text, text_head=text[:120])


def _max_eot(model):
    from runtime.tokenizer import get_tokenizer

    tok = get_tokenizer(str(model.tokenizer_path), model.is_multilingual, num_languages=model.num_languages,
                        language="en", task="transcribe")
    return int(tok.eot)


def run_openai(spec, rec):
    import torch
    import whisper
    from whisper.tokenizer import get_tokenizer

    torch.set_num_threads(spec["threads"])
    versions = {"torch": torch.__version__, "openai-whisper": _version("openai-whisper")}
    t = time.perf_counter()
    model = whisper.load_model(spec["model"], device="cpu")
    load_s = time.perf_counter() - t

    orig_decode = model.decode
    orig_encoder = model.encoder.forward
    orig_decoder = model.decoder.forward

    decode = recorded(rec, orig_decode)

    def encoder(*args, **kwargs):
        t0 = time.perf_counter()
        out = orig_encoder(*args, **kwargs)
        rec.encoder(time.perf_counter() - t0)
        return out

    def decoder(x, *args, **kwargs):
        out = orig_decoder(x, *args, **kwargs)
        rec.token(batch_rows(x))
        return out

    model.decode = decode
    model.encoder.forward = encoder
    model.decoder.forward = decoder

    opts = dict(spec["options"])
    opts.setdefault("fp16", False)
    paths = spec.get("audios") or [spec["audio"]]
    t0 = time.perf_counter()
    with torch.inference_mode():
        results = [model.transcribe(path, **opts) for path in paths]  # one file after the other
    wall = time.perf_counter() - t0
    eot = int(get_tokenizer(model.is_multilingual, num_languages=model.num_languages).eot)
    return dict(wall_s=wall, load_s=load_s, eot=eot, n_audio=len(paths), versions=versions,
                **_transcripts(results, eot))


def run_faster_whisper(spec, rec):
    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel

    versions = {"ctranslate2": ctranslate2.__version__, "faster-whisper": faster_whisper.__version__}
    t = time.perf_counter()
    model = WhisperModel(spec["model"], device="cpu", compute_type=spec.get("compute_type", "float32"),
                         cpu_threads=spec["threads"], num_workers=1)
    load_s = time.perf_counter() - t

    orig_encode = WhisperModel.encode
    orig_generate = WhisperModel.generate_with_fallback

    def encode(self, features):
        t0 = time.perf_counter()
        out = orig_encode(self, features)
        rec.encoder(time.perf_counter() - t0)
        return out

    def generate(self, encoder_output, prompt, tokenizer, options):
        # the encoder ran just before, outside this call: this window's record is the last one
        w = rec.windows[-1] if rec.windows and rec.windows[-1].get("outside_decode") else None
        start = time.time()
        t0 = time.perf_counter()
        out = orig_generate(self, encoder_output, prompt, tokenizer, options)
        dt = time.perf_counter() - t0
        result = out[0]
        n = len(result.sequences_ids[0])
        if w is None:
            w = {"encode_s": 0.0, "n_encode": 0}
            rec.windows.append(w)
        w.pop("outside_decode", None)
        w.update(tokens=n, decode_s=dt, wall_s=dt + w["encode_s"])
        if rec.first_token_time is None and n:
            rec.first_token_time = start + dt / n
            rec.first_token_estimated = True
        rec.total_tokens += n
        return out

    WhisperModel.encode = encode
    WhisperModel.generate_with_fallback = generate

    opts = dict(spec["options"])
    opts.setdefault("beam_size", 1)
    transcriber = model
    if spec.get("fw_batched"):  # BatchedInferencePipeline: the chunks of one file, batch_size at a time
        from faster_whisper import BatchedInferencePipeline

        transcriber = BatchedInferencePipeline(model)
        opts["batch_size"] = spec["decode_batch_size"]
        orig_batch = BatchedInferencePipeline.generate_segment_batched

        def generate_batch(self, features, tokenizer, options):
            # one decoder batch: encoder (hooked above, a record of its own) + one generate for all rows
            start = time.time()
            t0 = time.perf_counter()
            encoder_output, output = orig_batch(self, features, tokenizer, options)
            dt = time.perf_counter() - t0
            w = rec.windows[-1] if rec.windows and rec.windows[-1].get("outside_decode") else \
                {"encode_s": 0.0, "n_encode": 0}
            if w not in rec.windows:
                rec.windows.append(w)
            w.pop("outside_decode", None)
            n = sum(len(o["tokens"]) for o in output)
            longest = max((len(o["tokens"]) for o in output), default=0)
            w.update(tokens=n, wall_s=dt, decode_s=dt - w["encode_s"])
            if rec.first_token_time is None and longest:
                rec.first_token_time = start + w["encode_s"] + (dt - w["encode_s"]) / longest
                rec.first_token_estimated = True
            rec.total_tokens += n
            return encoder_output, output

        BatchedInferencePipeline.generate_segment_batched = generate_batch
    paths = spec.get("audios") or [spec["audio"]]
    t0 = time.perf_counter()
    results = []
    for path in paths:  # one file after the other
        segments, info = transcriber.transcribe(path, **opts)
        results.append({"segments": list(segments), "text": None})  # a generator: the decoding happens here
    wall = time.perf_counter() - t0
    eot = int(model.hf_tokenizer.token_to_id("<|endoftext|>"))
    return dict(wall_s=wall, load_s=load_s, eot=eot, n_audio=len(paths), versions=versions,
                **_transcripts(results, eot))


IMPLS = {"max": run_max, "max-sequential": run_max, "max-batched": run_max, "max-int8": run_max,
         "max-int8-batched": run_max, "openai": run_openai,
         "faster-whisper": run_faster_whisper, "faster-whisper-int8": run_faster_whisper,
         "faster-whisper-batched": run_faster_whisper, "faster-whisper-int8-batched": run_faster_whisper}


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pin_threads(threads):
    """Restrict this process to `threads` of the CPUs it may use (every implementation alike), so that
    a runtime that sizes its pool by the CPU count gets the same budget as the others."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if 0 < threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])
    return sorted(os.sched_getaffinity(0))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    if len(argv) > 1:
        spec["launch_time"] = float(argv[1])  # time.time() in the parent just before it launched this process
    rec = Recorder()
    out = {"impl": spec["impl"], "ok": False, "cpus": pin_threads(spec["threads"])}
    try:
        out.update(IMPLS[spec["impl"]](spec, rec))
        out.update(rec.summary())
        if not any(not w.get("outside_decode") for w in rec.windows):  # no per-window hook took
            out["decode_s"] = out["wall_s"] - sum(out["encode_s_per_window"])
            out["decode_s_approx"] = True
        out["ok"] = True
    except BaseException as exc:  # report every failure to the parent, then exit non-zero
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    out["launch_time"] = spec.get("launch_time")
    if out.get("first_token_time") and spec.get("launch_time"):
        out["cold_start_s"] = out["first_token_time"] - spec["launch_time"]
    out["self_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["python"] = sys.executable
    with open(spec["result_path"], "w") as f:
        json.dump(out, f)
    if not out["ok"]:
        print(out["traceback"], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
