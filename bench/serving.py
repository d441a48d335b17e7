"""The serving row of `make bench` (python -m bench --serving): `runtime serve` under 1, 4 and 16 concurrent
clients, against the same requests run one after the other by `runtime transcribe`.

Every client sends the same short clip (cut from the bench audio) with whisper.transcribe's options
(greedy, timestamps, conditioning) but no temperature fallback, and `sample_len` tokens per window,
so the work per request is fixed. The baseline is one `runtime transcribe` process over the same
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

    bin_dir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="serving-", dir=out_dir))
    clip = _clip(audio, clip_seconds, work)
    from runtime.audio import SAMPLE_RATE, load_audio

    clip_s = len(load_audio(clip)) / SAMPLE_RATE
    fields = {"language": "en", "sample_len": str(sample_len), "temperature_increment_on_fallback": "none",
              "response_format": "verbose_json"}
    cli_options = ["--language", "en", "--sample-len", str(sample_len), "--temperature-increment-on-fallback",
                   "none", "--beam-size", "none", "--verbose", "False", "--output-format", "json"]
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
    subprocess.run([str(bin_dir / "runtime"), "transcribe", *map(str, copies), "--model", str(model_dir),
                    "--threads", str(threads), "-o", str(work / "cli"), *cli_options], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start  # includes one model load (~0.3 s) and process start
    results["sequential_cli"] = {"requests": n, "wall_s": wall, "requests_per_s": n / wall,
                                 "audio_s_per_s": n * clip_s / wall}
    cli_tokens = [s["tokens"] for s in json.loads((work / "cli" / "copy-0.json").read_text())["segments"]]

    port = _free_port()
    log = open(work / "serve.log", "w")
    server = subprocess.Popen([str(bin_dir / "runtime"), "serve", "--model", str(model_dir), "--port", str(port),
                               "--threads", str(threads), "--max-batch", str(max(levels)), "--max-queue",
                               str(max(levels)), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"runtime serve did not start; see {work / 'serve.log'}")
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
            batches = after["batches"] - before["batches"]
            results["levels"][str(level)] = {
                "requests": total, "wall_s": wall, "requests_per_s": total / wall,
                "audio_s_per_s": total * clip_s / wall,
                "mean_batch": (after["batched_windows"] - before["batched_windows"]) / batches if batches else 0.0}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return results


def serving_table(results: dict) -> str:
    rows = ["| clients | requests | wall s | requests/s | audio s/s | mean windows per device batch |",
            "|---|---|---|---|---|---|"]
    seq = results["sequential_cli"]
    rows.append(f"| `runtime transcribe`, one after the other | {seq['requests']} | {seq['wall_s']:.2f} | "
                f"{seq['requests_per_s']:.2f} | {seq['audio_s_per_s']:.1f} | 1 |")
    for level, r in results["levels"].items():
        rows.append(f"| `runtime serve`, {level} concurrent | {r['requests']} | {r['wall_s']:.2f} | "
                    f"{r['requests_per_s']:.2f} | {r['audio_s_per_s']:.1f} | {r['mean_batch']:.1f} |")
    return "\n".join(rows)


def main(model_dir: Path, audio: Path, out_dir: Path, threads: int, sample_len: int) -> None:
    results = run_serving(model_dir, audio, out_dir, threads=threads, sample_len=sample_len)
    temp = out_dir / f".serving.json.{os.getpid()}.tmp"
    temp.write_text(json.dumps(results, indent=2))
    temp.replace(out_dir / "serving.json")
    print(f"\nserving: a {results['clip_s']:.1f} s clip per request, {sample_len} tokens per window, "
          f"{threads} threads\n")
    print(serving_table(results))
