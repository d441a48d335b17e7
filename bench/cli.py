"""`python -m bench`: this project's runtime against openai-whisper and faster-whisper.

By default the real-use workloads of bench/real.py: real tiny.en and base weights, whisper.transcribe()'s
and the CLI's defaults and many files at once, on lecture-en.flac and a few minutes of synthesized
speech (--models, --workloads, --impls, --audio, --repeats scope a run). `--workloads random` is the
decode-heavy workload described below, on a random-weight checkpoint.

In the random workload every implementation transcribes the same audio with the same checkpoint, the same decoding
settings and the same thread budget, each run in a fresh child process (bench/driver.py),
interleaved A B C A B C ... over the repetitions. Random weights never emit end-of-text, so every
30 s window decodes exactly --sample-len tokens: a fixed, decode-heavy workload.

Before any figure counts, a gate checks that every run's text token ids equal openai-whisper's;
where they do not, the first divergence (window, index, both ids) is printed and the
implementation is marked INVALID in the table and the JSON.

Outputs: a markdown table on stdout, OUT_DIR/results.json, OUT_DIR/bench.png (with matplotlib),
and one log per child under OUT_DIR/logs/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from bench import stats

REPO = Path(__file__).resolve().parent.parent
PEERS_HOME = Path.home() / ".cache" / "whisper-peers"
PEERS_PYTHON = PEERS_HOME / "venv" / "bin" / "python"
PEERS_CHECKPOINT = PEERS_HOME / "models" / "tiny-random.pt"
PEERS_CT2 = PEERS_HOME / "models" / "ct2-tiny-random"
SHARED_AUDIO = Path("/work/shared/audio/lecture-en.flac")
MAX_IMPL = "max"  # this project's runtime: the reference of the ratios

LABELS = {"max": "this project (MAX)", "max-sequential": "this project, one window at a time", "max-batched": "this project, transcribe_batch",
          "openai": "openai-whisper (torch fp32)", "faster-whisper": "faster-whisper (CT2 float32)"}


@dataclass
class Impl:
    name: str
    python: str
    model: str
    extra: dict = field(default_factory=dict)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those explain their default in words)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark this project's runtime against openai-whisper and faster-whisper "
                    "(same checkpoint, audio, decoding settings and threads; interleaved repetitions).",
        formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"openai-format .pt checkpoint (default: {PEERS_CHECKPOINT} when it exists, else a "
                        "seeded random tiny generated under artifacts/demo-inputs/)")
    p.add_argument("--ct2-model", default=None,
                   help=f"faster-whisper (CTranslate2) conversion of the same checkpoint; '' to leave faster-whisper "
                        f"out (default: {PEERS_CT2} when it exists and --checkpoint is the default)")
    p.add_argument("--peers-python", default=None,
                   help=f"python with openai-whisper (and faster-whisper) (default: {PEERS_PYTHON} when it "
                        "exists, else this python)")
    p.add_argument("--models", default="tiny.en,base",
                   help="real models of the api/cli/batch workloads (faster-whisper folders in ~/.cache/whisper or "
                        "~/.cache/whisper-peers/models, else fetched by `converter convert --model NAME`)")
    p.add_argument("--workloads", default="api,cli,batch",
                   help="comma-separated subset of api (whisper.transcribe() defaults), cli (the whisper CLI's: beam "
                        "5), batch (many files at once), random (random weights, decode-heavy; the options "
                        "--checkpoint, --ct2-model, --sample-len, --ts-repeats are its own)")
    p.add_argument("--audio", default=None,
                   help="comma-separated audio: lecture (../shared/audio/lecture-en.flac), long (SYNTH_SECONDS of "
                        "speech with pauses synthesized into OUT_DIR/audio, its text known), jfk, or file paths (a "
                        "sibling .txt is the spoken text) (default: lecture,long; the random workload takes the "
                        f"first, else {SHARED_AUDIO} or 154 s synthesized)")
    p.add_argument("--synth-seconds", type=float, default=210.0, help="length of the synthesized 'long' audio")
    p.add_argument("--threads", type=int, default=2, help="threads for every implementation")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repetitions of every workload (the random one: without timestamps)")
    p.add_argument("--ts-repeats", type=int, default=1,
                   help="repetitions of the timestamped workload (without_timestamps=False); 0 skips it")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    p.add_argument("--name", default=None,
                   help="artifact folder name for the checkpoint (default: bench-<checkpoint stem>)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifact root")
    p.add_argument("--sample-len", type=int, default=220, help="tokens decoded per 30 s window")
    p.add_argument("--impls", default="max,max-int8,openai,faster-whisper,faster-whisper-int8",
                   help="comma-separated subset of max, max-int8 (this project's int8 decoder build; real workloads "
                        "only), openai, faster-whisper (CT2 float32), faster-whisper-int8 (real workloads only)")
    p.add_argument("--batched", action=argparse.BooleanOptionalAction, default=True,
                   help="random workload: also measure runtime.transcribe_batch (BATCH_FILES copies of the audio)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="batch workload: decoder batch size of transcribe_batch and of faster-whisper's "
                        "BatchedInferencePipeline")
    p.add_argument("--batch-files", type=int, default=4,
                   help="files (copies of the audio) of the batch workload and of the random workload's "
                        "transcribe_batch row")
    p.add_argument("--batch-vad", action="store_true",
                   help="batch workload: this project with vad_filter=True too, like faster-whisper's pipeline "
                        "(then not gated: openai-whisper has no VAD)")
    p.add_argument("--serving", action="store_true",
                   help="instead of the table above: `runtime serve` at 1, 4 and 16 concurrent clients against "
                        "sequential `runtime transcribe` (bench/serving.py; a 20 s clip of the audio per request)")
    return p.parse_args(argv)


# --- preparation (outside the timed part) ------------------------------------------------------

def run_checked(cmd: List[str], what: str) -> None:
    print(f"$ {' '.join(map(str, cmd))}", flush=True)
    r = subprocess.run([str(c) for c in cmd], cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"bench: {what} failed (exit {r.returncode})")


def venv_tool(name: str) -> List[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    module = {"converter": "converter.cli", "graph-builders": "graph_builders.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.argv[0] = {name!r}; main()"]


def resolve_checkpoint(args) -> Path:
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            sys.exit(f"bench: checkpoint {args.checkpoint} not found")
        return args.checkpoint.resolve()
    if PEERS_CHECKPOINT.is_file():
        return PEERS_CHECKPOINT
    path = (REPO / "artifacts" / "demo-inputs" / "tiny-random.pt")
    if not path.is_file():
        run_checked([sys.executable, REPO / "tests" / "checkpoints.py", path, "0"], "generating a random checkpoint")
    return path


def resolve_audio(args) -> Path:
    if args.audio is not None:
        args.audio = Path(args.audio)
        if not args.audio.is_file():
            sys.exit(f"bench: audio {args.audio} not found")
        return args.audio.resolve()
    if SHARED_AUDIO.is_file():
        return SHARED_AUDIO
    path = (args.out_dir / "speech.wav").resolve()
    if not path.is_file():
        print(f"synthesizing speech into {path} (espeak-ng, ffmpeg)", flush=True)
        sys.path.insert(0, str(REPO / "tests"))
        from audio_samples import synthesize_speech

        synthesize_speech(path, n_sentences=32)
    return path


def audio_duration(path: Path) -> float:
    if shutil.which("ffprobe"):
        r = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True)
        try:
            return float(r.stdout.strip())
        except ValueError:
            pass
    from runtime.audio import SAMPLE_RATE, load_audio

    return len(load_audio(str(path))) / SAMPLE_RATE


def build_artifacts(checkpoint: Path, name: str, root: Path) -> Path:
    """converter convert + graph-builders compile; both skip when up to date."""
    run_checked(venv_tool("converter") + ["convert", "--checkpoint", checkpoint, "--name", name, "--out-dir", root],
                "converting the checkpoint")
    run_checked(venv_tool("graph-builders") + ["compile", root / name, "--device", "cpu"], "compiling the graphs")
    return (root / name).resolve() if root.is_absolute() else (REPO / root / name).resolve()


def probe_python(python: str) -> dict:
    """Which peer packages a python has, and their versions (importlib.metadata: no heavy imports)."""
    code = ("import json, importlib.util as u, importlib.metadata as m\n"
            "def v(d):\n    try: return m.version(d)\n    except Exception: return None\n"
            "print(json.dumps({'whisper': u.find_spec('whisper') is not None,"
            " 'faster_whisper': u.find_spec('faster_whisper') is not None,"
            " 'torch': v('torch'), 'openai-whisper': v('openai-whisper'),"
            " 'faster-whisper': v('faster-whisper'), 'ctranslate2': v('ctranslate2')}))")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args, peers: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    try:
        n_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        n_cpus = os.cpu_count()
    return {"cpu": cpu_model(), "cpus": n_cpus, "threads": args.threads, "max": v("max"), "torch": v("torch"),
            "peers_torch": peers.get("torch"), "openai-whisper": peers.get("openai-whisper") or v("openai-whisper"),
            "faster-whisper": peers.get("faster-whisper"), "ctranslate2": peers.get("ctranslate2"),
            "python": platform.python_version(), "platform": platform.platform()}


def environment_line(env: dict) -> str:
    torch = env["torch"] + (f" (peers {env['peers_torch']})" if env.get("peers_torch") not in (None, env["torch"]) else "")
    return (f"environment: CPU {env['cpu']} ({env['cpus']} CPUs), threads {env['threads']}, MAX {env['max']}, "
            f"torch {torch}, openai-whisper {env['openai-whisper']}, "
            f"ctranslate2 {env['ctranslate2'] or '-'}, faster-whisper {env['faster-whisper'] or '-'}")


# --- workloads -------------------------------------------------------------------------------

def decode_options(impl: str, timestamps: bool, sample_len: int) -> dict:
    """The same deterministic settings for everyone, in each implementation's spelling."""
    common = {"language": "en", "without_timestamps": not timestamps, "condition_on_previous_text": False,
              "temperature": 0.0}
    if impl == "faster-whisper":
        # CTranslate2 stops at (prompt + max_new_tokens) / 2 new tokens: the prompt is
        # sot, language, task (, no-timestamps), so 2 * sample_len - prompt gives sample_len tokens
        prompt = 3 if timestamps else 4
        return {**common, "max_new_tokens": 2 * sample_len - prompt, "beam_size": 1}
    opts = {**common, "sample_len": sample_len, "verbose": None}
    if impl == "openai":
        opts["fp16"] = False
    return opts


def run_child(impl: Impl, mode: str, rep: int, args, audio: Path, out_dir: Path, options: Optional[dict] = None) -> dict:
    timestamps = mode == "timestamps"
    tag = f"{mode}-{impl.name}-r{rep}"
    spec_path = out_dir / "runs" / f"{tag}.spec.json"
    result_path = out_dir / "runs" / f"{tag}.json"
    log_path = out_dir / "logs" / f"{tag}.log"
    if result_path.exists():
        result_path.unlink()
    spec = {"impl": impl.name, "model": impl.model, "audio": str(audio), "threads": args.threads,
            "options": options if options is not None else
            decode_options("max" if impl.name.startswith("max") else impl.name, timestamps, args.sample_len),
            "result_path": str(result_path), **impl.extra}
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        launch = time.time()
        proc = subprocess.Popen([impl.python, "-m", "bench.driver", str(spec_path), repr(launch)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak resident memory
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"impl": impl.name, "ok": False, "error": f"no result (exit {proc.returncode})"}
    result.update(mode=mode, rep=rep, returncode=proc.returncode, log=str(log_path),
                  maxrss_mb=usage.ru_maxrss / 1024.0, process_s=time.time() - launch)
    if proc.returncode != 0 and result.get("ok"):
        result.update(ok=False, error=f"exit {proc.returncode}")
    if not result.get("ok"):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        result.setdefault("error", "failed")
        print(f"    {impl.name} failed: {result['error']}" + "".join(f"\n      | {t}" for t in tail), flush=True)
    return result


# --- summary ---------------------------------------------------------------------------------

def gate(runs: List[dict], reference_impl: str = "openai") -> Dict[str, dict]:
    """Token equality of every run against openai-whisper's first successful run of the same mode."""
    out: Dict[str, dict] = {}
    ref = next((r for r in runs if r["impl"] == reference_impl and r.get("ok")), None)
    for impl in dict.fromkeys(r["impl"] for r in runs):
        mine = [r for r in runs if r["impl"] == impl and r.get("ok")]
        if ref is None or not mine:
            out[impl] = {"status": "unchecked", "reason": "no openai-whisper run to compare with" if ref is None
                         else "no successful run"}
            continue
        status = {"status": "valid", "divergences": []}
        for r in mine:
            n_copies = r.get("n_audio", 1)
            reference = ref["tokens_by_window"] * n_copies
            d = stats.find_divergence(reference, r["tokens_by_window"])
            if d is not None:
                status["status"] = "INVALID"
                status["divergences"].append({"rep": r["rep"], **d})
        out[impl] = status
    return out


def summarize(runs: List[dict], duration: float) -> Dict[str, dict]:
    impls = list(dict.fromkeys(r["impl"] for r in runs))
    ok = {i: {r["rep"]: r for r in runs if r["impl"] == i and r.get("ok")} for i in impls}
    base_wall = {k: r["wall_s"] for k, r in ok.get(MAX_IMPL, {}).items()}
    base_tok = {k: stats.per_token_ms(r["decode_s"], r["n_tokens"]) for k, r in ok.get(MAX_IMPL, {}).items()}
    out = {}
    for i in impls:
        rs = ok[i]
        wall = {k: r["wall_s"] for k, r in rs.items()}
        tok = {k: stats.per_token_ms(r["decode_s"], r["n_tokens"]) for k, r in rs.items()}
        enc = [1000 * sum(r["encode_s_per_window"]) / len(r["encode_s_per_window"]) if r["encode_s_per_window"]
               else None for r in rs.values()]
        out[i] = {
            "runs": len(rs), "failed": sum(1 for r in runs if r["impl"] == i and not r.get("ok")),
            "wall_s": stats.spread(wall.values()),
            "audio_s_per_s": stats.spread(duration * r.get("n_audio", 1) / r["wall_s"] for r in rs.values()),
            "ms_per_token": stats.spread(tok.values()),
            "encoder_ms_per_window": stats.spread(enc),
            "peak_rss_mb": stats.spread(r["maxrss_mb"] for r in rs.values()),
            "cold_start_s": stats.spread(r.get("cold_start_s") for r in rs.values()),
            "cold_start_estimated": any(r.get("first_token_estimated") for r in rs.values()),
            "load_s": stats.spread(r["load_s"] for r in rs.values()),
            "tokens": stats.median(r["n_tokens"] for r in rs.values()),
            "windows": stats.median(r["n_windows"] for r in rs.values()),
            "wall_ratio_vs_max": stats.ratio_summary(wall, base_wall),
            "ms_per_token_ratio_vs_max": stats.ratio_summary(tok, base_tok),
        }
    return out


def table(summary: Dict[str, dict], gates: Dict[str, dict]) -> str:
    head = ["implementation", "gate", "wall s: median (min–max)", "audio s/s", "ms/token", "encoder ms/window",
            "peak RSS MB", "cold start s", "wall ÷ this project", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl, s in summary.items():
        g = gates.get(impl, {}).get("status", "unchecked")
        ratio = "1.00 (ref)" if impl == MAX_IMPL and s["wall_s"] else stats.fmt(s["wall_ratio_vs_max"])
        cold = stats.fmt(s["cold_start_s"]) + (" (est.)" if s["cold_start_estimated"] and s["cold_start_s"] else "")
        runs = f"{s['runs']} run" + ("s" if s["runs"] != 1 else "") + (f", {s['failed']} failed" if s["failed"] else "")
        tokens = "-" if s["tokens"] is None else f"{s['tokens']:.0f} in {s['windows']:.0f} windows"
        lines.append("| " + " | ".join([
            f"{LABELS.get(impl, impl)} [{runs}]", g, stats.fmt(s["wall_s"]), stats.fmt(s["audio_s_per_s"], 1, False),
            stats.fmt(s["ms_per_token"], 1), stats.fmt(s["encoder_ms_per_window"], 0),
            stats.fmt(s["peak_rss_mb"], 0, False), cold, ratio, tokens]) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    modes = [m for m in ("main", "timestamps") if results["modes"].get(m)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        summary, gates = results["modes"][mode]["summary"], results["modes"][mode]["gate"]
        names = [i for i in summary if summary[i]["wall_s"]]
        med = [summary[i]["wall_s"]["median"] for i in names]
        err = [[m - summary[i]["wall_s"]["min"] for i, m in zip(names, med)],
               [summary[i]["wall_s"]["max"] - m for i, m in zip(names, med)]]
        colors = ["#d62728" if gates.get(i, {}).get("status") == "INVALID" else
                  ("#1f77b4" if i.startswith("max") else "#7f7f7f") for i in names]
        ax.bar(range(len(names)), med, yerr=err, capsize=6, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([LABELS.get(i, i).replace(" (", "\n(") + ("\nINVALID" if gates.get(i, {}).get("status")
                                                                       == "INVALID" else "") for i in names], fontsize=8)
        for x, (m, hi) in enumerate(zip(med, err[1])):
            ax.annotate(f"{m:.1f} s", (x, m + hi), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                        textcoords="offset points")
        title = "without timestamps" if mode == "main" else "with timestamps"
        ax.set_title(f"{title}: wall time (median, min–max)", fontsize=10)
        ax.set_ylabel("seconds")
    env = results["environment"]
    fig.suptitle(f"{Path(results['audio']).name} ({results['audio_s']:.0f} s), {env['threads']} threads, "
                 f"{env['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_random(args, env: dict, wanted: List[str], ct2: str, peers_python: str, openai_python: str, out_dir: Path):
    """The random-weight, decode-heavy workload (and --serving, on the same checkpoint). Its audio: the
    first of --audio (lecture, jfk or a path; long: the default), else lecture-en.flac or 154 s synthesized."""
    first = (args.audio or "").split(",")[0].strip()
    shared = {"lecture": SHARED_AUDIO, "jfk": SHARED_AUDIO.parent / "jfk.flac"}
    args = argparse.Namespace(**{**vars(args), "audio": None if first in ("", "long") else
                                 (str(shared[first]) if first in shared else first)})
    checkpoint = resolve_checkpoint(args)
    audio = resolve_audio(args)
    duration = audio_duration(audio)
    name = args.name or f"bench-{checkpoint.stem}"
    model_dir = build_artifacts(checkpoint, name, args.artifacts)
    if args.serving:
        from .serving import main as serving_main

        serving_main(model_dir, audio, out_dir, args.threads, args.sample_len)
        return None

    impls: List[Impl] = []
    if "max" in wanted:
        impls.append(Impl("max", sys.executable, str(model_dir)))
    if "openai" in wanted:
        impls.append(Impl("openai", openai_python, str(checkpoint)))
    if "faster-whisper" in wanted and ct2:
        impls.append(Impl("faster-whisper", peers_python, str(Path(ct2).resolve())))
    main_impls = list(impls)
    if "max" in wanted:
        # the default batches independent windows (same tokens); this shows one window at a time
        main_impls.insert(1, Impl("max-sequential", sys.executable, str(model_dir)))
    batched_note = None
    if args.batched:
        import runtime

        if hasattr(runtime, "transcribe_batch"):
            main_impls.append(Impl("max-batched", sys.executable, str(model_dir), {"batch_size": args.batch_files}))
        else:
            batched_note = "runtime.transcribe_batch does not exist yet: --batched skipped"
            print(f"bench: {batched_note}", flush=True)

    print(f"checkpoint {checkpoint}\nartifacts  {model_dir}\nfaster-whisper model {ct2 or '(none)'}\n"
          f"audio {audio} ({duration:.1f} s, {math.ceil(duration / 30)} windows of {args.sample_len} tokens)\n"
          f"implementations: {', '.join(i.name for i in main_impls)}; {args.repeats} repetition(s)"
          + (f", {args.ts_repeats} timestamped" if args.ts_repeats else ""), flush=True)

    results = {"environment": env, "checkpoint": str(checkpoint), "artifacts": str(model_dir), "ct2_model": ct2 or None,
               "audio": str(audio), "audio_s": duration, "threads": args.threads, "sample_len": args.sample_len,
               "repeats": args.repeats, "ts_repeats": args.ts_repeats, "batched": batched_note or args.batched,
               "options": {i.name: {m: decode_options("max" if i.name.startswith("max") else i.name, m == "timestamps",
                                                      args.sample_len) for m in ("main", "timestamps")}
                           for i in main_impls},
               "modes": {}}
    plan = [("main", main_impls, args.repeats)] + ([("timestamps", impls, args.ts_repeats)] if args.ts_repeats else [])
    any_invalid = False
    for mode, mode_impls, repeats in plan:
        runs: List[dict] = []
        for rep in range(1, repeats + 1):
            for impl in mode_impls:  # interleaved: A B C A B C ...
                print(f"[{mode} {rep}/{repeats}] {impl.name} ...", end=" ", flush=True)
                r = run_child(impl, mode, rep, args, audio, out_dir)
                runs.append(r)
                if r.get("ok"):
                    print(f"{r['wall_s']:.2f} s, {r['n_tokens']} tokens", flush=True)
            if rep == 1:  # the gate, as soon as every implementation has run once
                g = gate(runs)
                for impl_name, st in g.items():
                    if st["status"] == "INVALID":
                        d = st["divergences"][0]
                        print(f"GATE {mode}: {impl_name} INVALID: text tokens differ from openai-whisper's at "
                              f"{stats.describe_divergence(d)}", flush=True)
        gates = gate(runs)
        any_invalid |= any(g["status"] == "INVALID" for g in gates.values())
        results["modes"][mode] = {"gate": gates, "summary": summarize(runs, duration),
                                  "runs": [{k: v for k, v in r.items() if k != "tokens_by_window"} for r in runs]}

    print()
    print(environment_line(env))
    print(f"audio: {audio.name}, {duration:.1f} s; checkpoint: {checkpoint.name}; threads: {args.threads}; "
          f"every window decodes up to {args.sample_len} tokens; temperature 0, greedy")
    for mode, block in results["modes"].items():
        title = "without timestamps" if mode == "main" else "with timestamps"
        print(f"\n### {title} ({max((s['runs'] for s in block['summary'].values()), default=0)} repetition(s))\n")
        print(table(block["summary"], block["gate"]))
        for impl_name, st in block["gate"].items():
            if st["status"] == "INVALID":
                for d in st["divergences"]:
                    print(f"- {impl_name} INVALID (repetition {d['rep']}): {stats.describe_divergence(d)}")
            elif st["status"] == "unchecked":
                print(f"- {impl_name}: tokens unchecked ({st['reason']})")
    print("\nwall: transcribe() only (model loaded before); ms/token: decode time (window minus encoder) / decoded "
          "tokens; ratios: peer ÷ this project per repetition, median (min–max); cold start: process launch to "
          "first decoded token" + (" (est.: CTranslate2 has no per-token hook: its first generate's start plus one "
                                   "average token)" if any(i.name == "faster-whisper" for i in impls) else ""))

    return results, any_invalid


# --- main ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 1:
        sys.exit("bench: --repeats must be at least 1")
    out_dir = args.out_dir.resolve()
    for sub in ("runs", "logs"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    wanted = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = set(wanted) - {"max", "max-int8", "openai", "faster-whisper", "faster-whisper-int8"}
    if unknown:
        sys.exit(f"bench: unknown implementation(s) {', '.join(sorted(unknown))}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - {"api", "cli", "batch", "random"}
    if unknown or not workloads:
        sys.exit(f"bench: unknown workload(s) {', '.join(sorted(unknown)) or '(none given)'}")

    # peers: openai-whisper from the peers' venv, else from this one
    peers_python = args.peers_python or (str(PEERS_PYTHON) if PEERS_PYTHON.exists() else sys.executable)
    peers = probe_python(peers_python)
    openai_python = peers_python
    if not peers.get("whisper"):
        print(f"bench: {peers_python} has no openai-whisper; using {sys.executable}", flush=True)
        openai_python = sys.executable
    ct2 = args.ct2_model
    if ct2 is None:
        ct2 = str(PEERS_CT2) if (args.checkpoint is None and PEERS_CT2.is_dir()) else ""
    if ct2 and not peers.get("faster_whisper"):
        print(f"bench: {peers_python} has no faster-whisper; leaving it out", flush=True)
        ct2 = ""

    env = environment(args, peers if peers.get("whisper") else probe_python(sys.executable))
    print(environment_line(env), flush=True)

    results = {"environment": env}
    any_invalid = False
    if args.serving or "random" in workloads:
        random = run_random(args, env, wanted, ct2, peers_python, openai_python, out_dir)
        if random is None:  # --serving
            return
        results, any_invalid = random
    real = [w for w in workloads if w != "random"]
    if real:
        from bench import real as real_bench

        pythons = {"max": sys.executable, "openai": openai_python, "fw": peers_python}
        real_wanted = [i for i in wanted if i in ("max", "max-int8", "openai") or (i.startswith("faster-whisper")
                                                                      and peers.get("faster_whisper"))]
        blocks = real_bench.run_real(args, real_wanted, pythons, out_dir, run_child, run_checked, venv_tool,
                                     audio_duration, Impl)
        results["real"] = blocks
        any_invalid |= real_bench.any_invalid(blocks)
        text = real_bench.markdown(blocks)
        print("\n" + environment_line(env) + f"; {args.repeats} interleaved repetition(s)\n\n" + text)
        (out_dir / "results.md").write_text(f"{environment_line(env)}; {args.repeats} interleaved repetition(s)\n\n"
                                            f"{text}\n")
        print(f"\nmarkdown: {out_dir / 'results.md'}")

    out_json = out_dir / "results.json"
    out_json.write_text(json.dumps(results, indent=1))
    png = out_dir / "bench.png"
    problem = plot(results, png) if "modes" in results else "no chart (the chart is the random workload's)"
    print(f"\nresults: {out_json}" + ("" if problem else f"\nchart:   {png}") + (f"\n{problem}" if problem else ""))
    if any_invalid:
        print("some implementation is INVALID: its tokens differ from openai-whisper's (see above)")
