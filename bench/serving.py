"""The serving row of `make bench` (python -m bench --serving): `runtime serve` under 1, 4 and 16 concurrent
clients, against the same requests run one after the other by `runtime transcribe`; and the server's memory
under long uploads (python -m bench.serving --memory, see run_memory below).

Every client sends the same clip (cut from the bench audio; `python -m bench.serving` takes a 60 s one
by default, two windows the second of which is conditioned on the first's text) with
whisper.transcribe's options (greedy, timestamps, conditioning) but no temperature fallback, so the
work per request is fixed (`sample_len` caps the tokens per window where asked). The baseline is one `runtime transcribe` process over the same
number of copies of the clip: the model loads once, the files are transcribed in turn. Reported:
requests per second and audio seconds per second; the first request of each level is a warm-up
and is not timed. The server is checked to return the CLI's tokens for the clip before timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict


# the runtime of this checkout, whatever the venv's console scripts import
RUNTIME = [sys.executable, "-m", "runtime.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip(audio: Path, seconds: float, folder: Path) -> Path:
    path = folder / f"serving-clip-{seconds:g}s.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(audio), "-t", str(seconds),
                    "-ar", "16000", "-ac", "1", str(path)], check=True)
    return path


def run_serving(model_dir: Path, audio: Path, out_dir: Path, *, threads: int, sample_len: int,
                levels=(1, 4, 16), clip_seconds: float = 20.0, requests_per_client: int = 2) -> dict:
    import httpx

    work = Path(tempfile.mkdtemp(prefix="serving-", dir=out_dir))
    clip = _clip(audio, clip_seconds, work)
    from runtime.audio import SAMPLE_RATE, load_audio

    clip_s = len(load_audio(clip)) / SAMPLE_RATE
    fields = {"language": "en", "temperature_increment_on_fallback": "none", "response_format": "verbose_json"}
    cli_options = ["--language", "en", "--temperature-increment-on-fallback",
                   "none", "--beam-size", "none", "--verbose", "False", "--output-format", "json"]
    if sample_len:  # else whisper.transcribe()'s: up to 224 tokens a window
        fields["sample_len"] = str(sample_len)
        cli_options += ["--sample-len", str(sample_len)]
    env = {**os.environ, "MODULAR_LOG_LEVEL": "error"}
    results: Dict[str, dict] = {"clip_s": clip_s, "sample_len": sample_len, "threads": threads, "levels": {}}

    # baseline: runtime transcribe over as many copies as the largest level sends, one after the other
    n = max(levels) * requests_per_client
    copies = []
    for i in range(n):
        copy = work / f"copy-{i}.wav"
        copy.write_bytes(clip.read_bytes())
        copies.append(copy)
    start = time.perf_counter()
    subprocess.run([*RUNTIME, "transcribe", *map(str, copies), "--model", str(model_dir),
                    "--threads", str(threads), "-o", str(work / "cli"), *cli_options], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start  # includes one model load (~0.3 s) and process start
    results["sequential_cli"] = {"requests": n, "wall_s": wall, "requests_per_s": n / wall,
                                 "audio_s_per_s": n * clip_s / wall}
    cli_tokens = [s["tokens"] for s in json.loads((work / "cli" / "copy-0.json").read_text())["segments"]]

    server, url, log = _start_server(model_dir, work / "serve.log", "--threads", str(threads), "--max-batch",
                                     str(max(levels)), "--max-queue", str(max(levels)))
    try:
        data = clip.read_bytes()

        def request(_=None) -> dict:
            r = httpx.post(f"{url}/v1/audio/transcriptions", data=fields, files={"file": ("clip.wav", data)},
                           timeout=3600)
            r.raise_for_status()
            return r.json()

        served = request()  # warm-up, and the gate: the CLI's tokens
        if [s["tokens"] for s in served["segments"]] != cli_tokens:
            raise RuntimeError("runtime serve returned other tokens than runtime transcribe for the same clip")
        for level in levels:
            total = level * requests_per_client
            before = httpx.get(f"{url}/health").json()
            start = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                list(pool.map(request, range(total)))
            wall = time.perf_counter() - start
            after = httpx.get(f"{url}/health").json()
            steps = after["decoder_steps"] - before["decoder_steps"]
            results["levels"][str(level)] = {
                "requests": total, "wall_s": wall, "requests_per_s": total / wall,
                "audio_s_per_s": total * clip_s / wall,
                "mean_batch": (after["row_steps"] - before["row_steps"]) / steps if steps else 0.0}
    finally:
        _stop_server(server, log)
    return results


def serving_table(results: dict) -> str:
    rows = ["| clients | requests | wall s | requests/s | audio s/s | mean rows per decoder step |",
            "|---|---|---|---|---|---|"]
    seq = results["sequential_cli"]
    rows.append(f"| `runtime transcribe`, one after the other | {seq['requests']} | {seq['wall_s']:.2f} | "
                f"{seq['requests_per_s']:.2f} | {seq['audio_s_per_s']:.1f} | 1 |")
    for level, r in results["levels"].items():
        rows.append(f"| `runtime serve`, {level} concurrent | {r['requests']} | {r['wall_s']:.2f} | "
                    f"{r['requests_per_s']:.2f} | {r['audio_s_per_s']:.1f} | {r['mean_batch']:.1f} |")
    return "\n".join(rows)


def main(model_dir: Path, audio: Path, out_dir: Path, threads: int, sample_len: int,
         clip_seconds: float = 20.0) -> None:
    results = run_serving(model_dir, audio, out_dir, threads=threads, sample_len=sample_len,
                          clip_seconds=clip_seconds)
    temp = out_dir / f".serving.json.{os.getpid()}.tmp"
    temp.write_text(json.dumps(results, indent=2))
    temp.replace(out_dir / "serving.json")
    tokens = f"{sample_len} tokens per window" if sample_len else "up to 224 tokens per window"
    print(f"\nserving: {model_dir.name}, a {results['clip_s']:.1f} s clip per request, {tokens}, "
          f"{threads} threads\n")
    print(serving_table(results))


# --- memory under long uploads ----------------------------------------------------------------------

def _memory_mb(pid: int) -> Dict[str, float]:
    """VmRSS, VmHWM (the peak resident set), RssAnon and RssFile of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def _reset_peak(pid: int) -> bool:
    """Set the process's VmHWM back to its current RSS (Linux 4.0+: clear_refs 5); False where refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """The largest VmRSS seen, every `interval` s, in a thread: a check on VmHWM (which it can only miss)."""

    def __init__(self, pid: int, interval: float = 0.05):
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, _memory_mb(self.pid)["VmRSS"])
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def _looped(audio: Path, seconds: float, offset: float, path: Path) -> Path:
    """`seconds` of `audio` played in a loop from `offset` s on, as 16 kHz mono FLAC (ffmpeg)."""
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-stream_loop", "-1", "-i", str(audio),
                    "-ss", f"{offset:g}", "-t", f"{seconds:g}", "-ar", "16000", "-ac", "1", "-c:a", "flac", str(path)],
                   check=True)
    return path


def _start_server(model_dir: Path, log_path: Path, *args: str):
    import httpx

    port = _free_port()
    env = {**os.environ, "MODULAR_LOG_LEVEL": "error"}
    log = open(log_path, "w")
    server = subprocess.Popen([*RUNTIME, "serve", "--model", str(model_dir), "--port", str(port),
                               "--log-level", "warning", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server, url, log
        except httpx.HTTPError:
            time.sleep(0.5)
    _stop_server(server, log)
    raise RuntimeError(f"runtime serve did not start; see {log_path}")


def _stop_server(server, log) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


MEMORY_FIELDS = {"language": "en", "response_format": "verbose_json"}  # the rest: whisper.transcribe()'s defaults


def run_memory(model_dir: Path, audio: Path, work: Path, *, threads: int, hour_s: float = 3600.0,
               concurrent: int = 16, concurrent_s: float = 300.0, max_batch: int = 0,
               scenarios=("hour", "concurrent")) -> dict:
    """The server's memory under long uploads: `runtime serve` (a fresh process per scenario, after one warm-up
    request of 20 s) gets one `hour_s` request, or `concurrent` requests of `concurrent_s` seconds at once, each
    of `audio` played in a loop from a different point. Recorded from /proc/PID/status: the RSS before, the peak
    (VmHWM, reset after the warm-up, and the largest RSS sampled every 50 ms), the RSS after the last answer,
    and the wall time. Every request uses whisper.transcribe()'s defaults (greedy, temperature fallback,
    conditioning on previous text) with language en; each answer's duration must be its file's."""
    import httpx

    max_batch = max_batch or max(concurrent, 8)
    work.mkdir(parents=True, exist_ok=True)
    warm_up = _looped(audio, 20, 0, work / "warm-up.flac")
    plans = {"hour": [_looped(audio, hour_s, 0, work / f"long-{hour_s:g}s.flac")],
             "concurrent": [_looped(audio, concurrent_s, 7 * i, work / f"concurrent-{i}-{concurrent_s:g}s.flac")
                            for i in range(concurrent)] if "concurrent" in scenarios else []}
    results: Dict[str, dict] = {"threads": threads, "max_batch": max_batch, "audio": str(audio), "scenarios": {}}
    for name in scenarios:
        files = plans[name]
        upload_mb = max(100.0, 1.2 * max(f.stat().st_size for f in files) / (1 << 20))
        server, url, log = _start_server(model_dir, work / f"serve-{name}.log", "--threads", str(threads),
                                         "--max-batch", str(max_batch), "--max-queue", str(len(files)),
                                         "--max-upload-mb", f"{upload_mb:.0f}")
        try:
            def request(path: Path) -> dict:
                with open(path, "rb") as f:
                    r = httpx.post(f"{url}/v1/audio/transcriptions", data=MEMORY_FIELDS,
                                   files={"file": (path.name, f)}, timeout=4 * 3600)
                r.raise_for_status()
                return r.json()

            request(warm_up)
            time.sleep(1.0)
            before = _memory_mb(server.pid)
            reset = _reset_peak(server.pid)
            with _Sampler(server.pid) as sampler:
                start = time.perf_counter()
                with ThreadPoolExecutor(len(files)) as pool:
                    answers = list(pool.map(request, files))
                wall = time.perf_counter() - start
            peak = _memory_mb(server.pid)
            time.sleep(2.0)  # the request threads have finished and dropped what they held
            after = _memory_mb(server.pid)
            health = httpx.get(f"{url}/health", timeout=30).json()
        finally:
            _stop_server(server, log)
        seconds = []
        for path, answer in zip(files, answers):
            expected = float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                                             "csv=p=0", str(path)], capture_output=True, text=True).stdout)
            if abs(answer["duration"] - expected) > 0.05 or not answer["segments"]:
                raise RuntimeError(f"{path.name}: the answer has duration {answer['duration']} s and "
                                   f"{len(answer['segments'])} segments (expected {expected} s)")
            seconds.append(expected)
        results["scenarios"][name] = {
            "requests": len(files), "audio_s_each": seconds[0], "upload_mb_each": files[0].stat().st_size / 1e6,
            "wall_s": wall, "audio_s_per_s": sum(seconds) / wall,
            "rss_before_mb": before["VmRSS"], "peak_rss_mb": peak["VmHWM"] if reset else None,
            "peak_rss_sampled_mb": max(sampler.peak, peak["VmRSS"]), "rss_after_mb": after["VmRSS"],
            "peak_over_before_mb": (peak["VmHWM"] if reset else sampler.peak) - before["VmRSS"],
            "rss_anon_before_mb": before["RssAnon"], "rss_file_before_mb": before["RssFile"],
            "rss_anon_after_mb": after["RssAnon"], "rss_file_after_mb": after["RssFile"],
            "segments": sum(len(a["segments"]) for a in answers), "largest_batch": health["largest_batch"]}
    return results


def _length(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min" if seconds >= 60 \
        else f"{seconds:.3g} s"


def memory_table(results: dict) -> str:
    rows = ["| requests | audio each | wall s | audio s/s | RSS before MB | peak RSS MB (VmHWM) | peak - before MB "
            "| RSS after MB |", "|---|---|---|---|---|---|---|---|"]
    for r in results["scenarios"].values():
        peak = r["peak_rss_mb"] if r["peak_rss_mb"] is not None else r["peak_rss_sampled_mb"]
        rows.append(f"| {r['requests']} | {_length(r['audio_s_each'])} | {r['wall_s']:.1f} | "
                    f"{r['audio_s_per_s']:.1f} | {r['rss_before_mb']:.0f} | {peak:.0f} | "
                    f"{r['peak_over_before_mb']:.0f} | {r['rss_after_mb']:.0f} |")
    return "\n".join(rows)


def _write_json(results: dict, path: Path) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(results, indent=2))
    temp.replace(path)


def cli(argv=None) -> None:
    """python -m bench.serving [--memory]: this module's measurements on given artifacts (e.g. the real
    tiny.en), without the rest of `python -m bench`."""
    import argparse
    import shutil

    from bench.cli import SHARED_AUDIO, cpu_model

    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("artifacts/tiny.en"), help="compiled artifact folder")
    p.add_argument("--audio", type=Path, default=SHARED_AUDIO, help="speech to send (looped to length)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", action="store_true",
                   help="the server's memory under long uploads (into OUT_DIR/serving-memory.json) instead of "
                        "the throughput levels (OUT_DIR/serving.json)")
    p.add_argument("--scenarios", default="hour,concurrent", help="--memory: hour, concurrent or both")
    p.add_argument("--hour-seconds", type=float, default=3600.0, help="--memory: length of the one long request")
    p.add_argument("--concurrent", type=int, default=16, help="--memory: requests sent at once")
    p.add_argument("--concurrent-seconds", type=float, default=300.0, help="--memory: length of each of them")
    p.add_argument("--max-batch", type=int, default=0,
                   help="--memory: the server's --max-batch (default: --concurrent, so all of them run at once)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="--memory: where the generated audio goes (default: a temporary folder, removed after)")
    p.add_argument("--sample-len", type=int, default=0,
                   help="throughput levels: tokens per window (0: whisper.transcribe()'s, up to 224)")
    p.add_argument("--clip-seconds", type=float, default=60.0,
                   help="throughput levels: the clip each request sends (over 30 s: windows conditioned on "
                        "the previous window's text)")
    args = p.parse_args(argv)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.memory:
        if args.clip_seconds <= 0:
            sys.exit(f"bench.serving: --clip-seconds must be positive, got {args.clip_seconds}")
        return main(args.model.resolve(), args.audio.resolve(), out_dir, args.threads, args.sample_len,
                    args.clip_seconds)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    if not scenarios or set(scenarios) - {"hour", "concurrent"}:
        sys.exit(f"bench.serving: --scenarios takes hour and concurrent, got {args.scenarios!r}")
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="serving-memory-"))
    try:
        results = run_memory(args.model.resolve(), args.audio.resolve(), work, threads=args.threads,
                             hour_s=args.hour_seconds, concurrent=args.concurrent,
                             concurrent_s=args.concurrent_seconds, max_batch=args.max_batch, scenarios=scenarios)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results.update(model=str(args.model), cpu=cpu_model(), cpus=len(os.sched_getaffinity(0)))
    _write_json(results, out_dir / "serving-memory.json")
    print(f"\n`runtime serve` memory: {args.model.name}, {results['cpu']} ({results['cpus']} CPUs), "
          f"--threads {args.threads}, --max-batch {results['max_batch']}\n")
    print(memory_table(results))


if __name__ == "__main__":
    cli()
