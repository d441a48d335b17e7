"""The real-use workloads of `python -m bench`: real weights, each implementation's defaults.

Models: openai's tiny.en and base as faster-whisper (CTranslate2, float16) folders. This project converts
and compiles them (converter convert --checkpoint FOLDER); faster-whisper runs the very same folder
(compute_type float32 and int8); openai-whisper runs the same weights as a `.pt` written from the
converted artifacts (weights.safetensors + model.json's dims) into OUT_DIR/models/. `max-int8` is this
project's int8 decoder build of the same artifacts (compute type int8, not exact: its tokens are reported
against openai-whisper's with its WER, not gated).

Workloads (each with every implementation's spelling of the same settings):
- api: whisper.transcribe()'s defaults: greedy, temperature fallback (0, 0.2 ... 1.0, best_of 5 when
  sampling), conditioning on previous text, timestamps;
- cli: the `whisper` command's defaults: the same with beam search (beam_size 5, best_of 5);
- batch: many files at once (--batch-files copies of the audio): this project's runtime.transcribe_batch
  (`runtime transcribe --batch-size N`: fixed 30 s chunks, without timestamps, no conditioning, beam 5)
  against faster-whisper's BatchedInferencePipeline with the same batch size (its defaults: VAD on,
  without timestamps, beam 5), and openai-whisper transcribing the files one after the other with
  without_timestamps=True, condition_on_previous_text=False, beam 5 (the gate's reference: on the 30 s
  grid it gives the batched tokens).

Gate: this project's token ids must equal openai-whisper's, window by window, up to the first window that
either side decoded by sampling (temperature fallback above 0: openai-whisper samples with torch's
generator, so from there equality is not expected; the table says how many windows were compared).
faster-whisper is not token-identical to openai-whisper (its beam search differs), so its tokens are
reported but not gated; every implementation's word error rate is reported against the known text of the
synthesized speech (and of jfk.flac), and against openai-whisper's own transcript.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from bench import stats
from bench.wer import word_error_rate, words

REPO = Path(__file__).resolve().parent.parent
SHARED = Path("/work/shared/audio")
CT2_HOMES = [Path.home() / ".cache" / "whisper", Path.home() / ".cache" / "whisper-peers" / "models"]
MODELS = ("tiny.en", "base")
WORKLOADS = ("api", "cli", "batch")
FW_IMPLS = {"faster-whisper": "float32", "faster-whisper-int8": "int8"}
EXACT = {"max", "max-batched"}  # must give openai-whisper's tokens
JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")

LABELS = {
    "max": "this project (MAX)", "max-batched": "this project, transcribe_batch",
    "max-int8": "this project, int8 decoder (not exact)",
    "max-int8-batched": "this project, int8 decoder, transcribe_batch (not exact)",
    "openai": "openai-whisper (torch fp32)", "faster-whisper": "faster-whisper (CT2 float32)",
    "faster-whisper-int8": "faster-whisper (CT2 int8)",
    "faster-whisper-batched": "faster-whisper BatchedInferencePipeline (float32)",
    "faster-whisper-int8-batched": "faster-whisper BatchedInferencePipeline (int8)",
}
WORKLOAD_TITLES = {
    "api": "API defaults (greedy, temperature fallback, conditioning, timestamps)",
    "cli": "CLI defaults (beam 5, best_of 5, temperature fallback, conditioning, timestamps)",
    "batch": "many files at once",
}


@dataclass
class Audio:
    key: str
    path: Path
    duration: float
    text: Optional[str] = None  # what was said, when known


@dataclass
class Model:
    name: str
    ct2: Path
    artifacts: Path
    checkpoint: Path  # openai-format .pt with the same weights


# --- preparation -----------------------------------------------------------------------------

def find_ct2(name: str) -> Optional[Path]:
    for home in CT2_HOMES:
        folder = home / f"ct2-{name}"
        if (folder / "model.bin").is_file():
            return folder
    return None


def prepare_model(name: str, artifacts_root: Path, out_dir: Path, run_checked, venv_tool, int8: bool = False) -> Model:
    """The CTranslate2 folder (fetched by `converter convert --model NAME` when not here), converted and
    compiled (both skip when up to date; with int8 also the int8 decoder build), and the openai-format .pt
    written from the artifacts."""
    ct2 = find_ct2(name)
    if ct2 is None:
        run_checked(venv_tool("converter") + ["convert", "--model", name, "--out-dir", artifacts_root],
                    f"fetching {name}")
        ct2 = find_ct2(name)
        if ct2 is None:
            sys.exit(f"bench: no faster-whisper folder for {name} in {', '.join(map(str, CT2_HOMES))}")
    run_checked(venv_tool("converter") + ["convert", "--checkpoint", ct2, "--name", name, "--out-dir", artifacts_root],
                f"converting {name}")
    run_checked(venv_tool("graph-builders") + ["compile", artifacts_root / name, "--device", "cpu"],
                f"compiling {name}")
    if int8:
        run_checked(venv_tool("graph-builders") + ["compile", artifacts_root / name, "--device", "cpu",
                                                   "--decoder-weights", "int8"], f"compiling {name} (int8 decoder)")
    artifacts = (artifacts_root / name).resolve()
    checkpoint = out_dir / "models" / f"{name}.pt"
    write_checkpoint(artifacts, checkpoint)
    return Model(name, ct2.resolve(), artifacts, checkpoint)


def write_checkpoint(artifacts: Path, path: Path) -> Path:
    """openai's .pt format ({"dims", "model_state_dict"}) from the artifacts' weights, unless up to date."""
    weights_json = json.loads((artifacts / "model.json").read_text())
    weights = artifacts / weights_json["weights"]["file"]
    if path.is_file() and path.stat().st_mtime >= weights.stat().st_mtime:
        return path
    import torch
    from safetensors.torch import load_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".pt.tmp")
    torch.save({"dims": dict(weights_json["dims"]), "model_state_dict": load_file(str(weights))}, temp)
    temp.replace(path)
    return path


def long_speech(path: Path, seconds: float) -> str:
    """About `seconds` of synthesized English (several voices and speeds, pauses of 0.5-4 s between
    passages) as a 16 kHz mono WAV; returns the words spoken, in order."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from audio_samples import DEMO_PARAGRAPH, SENTENCES, _read_wav, _write_wav, speak

    plan = [(DEMO_PARAGRAPH, "en-us", 150, 3.0)]
    voices = [("en-gb", 170, 2.0), ("en-us", 140, 4.0), ("en-gb-x-rp", 160, 1.0), ("en-us", 185, 0.5)]
    for i in range(200):
        voice, wpm, pause = voices[i % len(voices)]
        plan.append((" ".join(SENTENCES[(3 * i + j) % len(SENTENCES)] for j in range(3)), voice, wpm, pause))
    pieces, spoken, total = [], [], 0
    for text, voice, wpm, pause in plan:
        if total >= seconds * 16000:
            break
        wav = speak(text, path.with_suffix(f".{len(spoken)}.wav"), voice, wpm)
        samples = _read_wav(wav)
        wav.unlink()
        pieces += [samples, np.zeros(int(pause * 16000))]
        spoken.append(text)
        total += len(samples) + int(pause * 16000)
    _write_wav(path, np.concatenate(pieces))
    return " ".join(spoken)


def resolve_audios(spec: str, out_dir: Path, synth_seconds: float, duration_of) -> List[Audio]:
    """--audio: comma-separated lecture (../shared's lecture-en.flac), jfk (../shared's jfk.flac), long
    (synthesized, SYNTH_SECONDS) or file paths (a sibling .txt is their known text)."""
    out: List[Audio] = []
    for key in [k.strip() for k in spec.split(",") if k.strip()]:
        text = None
        if key == "lecture":
            path = SHARED / "lecture-en.flac"
        elif key == "jfk":
            path, text = SHARED / "jfk.flac", JFK_TEXT
        elif key == "long":
            path = out_dir / "audio" / f"long-{synth_seconds:g}s.wav"
            reference = path.with_suffix(".txt")
            if not (path.is_file() and reference.is_file()):
                print(f"synthesizing {synth_seconds:g} s of speech into {path} (espeak-ng, ffmpeg)", flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                reference.write_text(long_speech(path, synth_seconds))
            text = reference.read_text()
        else:
            path = Path(key).expanduser()
            if path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_text()
        if not path.is_file():
            print(f"bench: audio {key}: {path} not found, left out", flush=True)
            continue
        out.append(Audio(key if key in ("lecture", "jfk", "long") else path.stem, path.resolve(),
                         duration_of(path), text))
    return out


# --- workloads -------------------------------------------------------------------------------

def workload_options(workload: str, impl: str, batch_vad: bool = False) -> dict:
    """The same settings in each implementation's spelling (its defaults where they agree)."""
    family = "max" if impl.startswith("max") else ("fw" if impl.startswith("faster-whisper") else "openai")
    if workload == "batch":
        if family == "fw":  # BatchedInferencePipeline's defaults: beam 5, best_of 5, no timestamps, VAD
            return {"beam_size": 5, "best_of": 5, "without_timestamps": True}
        common = {"beam_size": 5, "best_of": 5, "without_timestamps": True, "condition_on_previous_text": False}
        if family == "max":
            return {**common, "vad_filter": True} if batch_vad else common
        return {**common, "verbose": None, "fp16": False}
    if workload not in ("api", "cli"):
        raise ValueError(f"unknown workload {workload!r}")
    beam = workload == "cli"
    if family == "fw":  # faster-whisper's own defaults are beam 5: greedy must be asked for
        return {"beam_size": 5 if beam else 1, "best_of": 5}
    opts = {"beam_size": 5, "best_of": 5} if beam else {}
    opts["verbose"] = None
    if family == "openai":
        opts["fp16"] = False
    return opts


def workload_impls(workload: str, wanted: List[str]) -> List[str]:
    """Implementation names of a workload, in table order."""
    out = []
    for impl in wanted:
        if impl in ("max", "max-int8"):
            out.append(f"{impl}-batched" if workload == "batch" else impl)
        elif impl == "openai":
            out.append("openai")
        elif impl in FW_IMPLS:
            out.append(f"{impl}-batched" if workload == "batch" else impl)
    return out


def impl_spec(impl: str, model: Model, workload: str, audio: Audio, args) -> dict:
    """What the driver needs besides the options: which python, model, files."""
    files = [str(audio.path)] * (args.batch_files if workload == "batch" else 1)
    spec = {"audios": files}
    if impl.startswith("max"):
        spec["model"] = str(model.artifacts)
        if impl.startswith("max-int8"):
            spec["compute_type"] = "int8"
        if workload == "batch":
            spec["decode_batch_size"] = args.batch_size
    elif impl == "openai":
        spec["model"] = str(model.checkpoint)
    else:
        base = impl.replace("-batched", "")
        spec.update(model=str(model.ct2), compute_type=FW_IMPLS[base])
        if workload == "batch":
            spec.update(fw_batched=True, decode_batch_size=args.batch_size)
    return spec


# --- gate, WER, summary ----------------------------------------------------------------------

def gate(runs: List[dict], exact=EXACT, reference_impl: str = "openai", unchecked: Optional[Dict[str, str]] = None
         ) -> Dict[str, dict]:
    """Every implementation's tokens against openai-whisper's first successful run, up to the first window
    either side sampled. Implementations in `exact` are INVALID where they differ; others 'differ'."""
    unchecked = unchecked or {}
    ref = next((r for r in runs if r["impl"] == reference_impl and r.get("ok")), None)
    out: Dict[str, dict] = {}
    for impl in dict.fromkeys(r["impl"] for r in runs):
        mine = [r for r in runs if r["impl"] == impl and r.get("ok")]
        if impl in unchecked:
            out[impl] = {"status": "unchecked", "reason": unchecked[impl]}
            continue
        if ref is None or not mine:
            out[impl] = {"status": "unchecked", "reason": "no openai-whisper run to compare with" if ref is None
                         else "no successful run"}
            continue
        status = {"status": "reference" if impl == reference_impl else "identical", "divergences": [],
                  "compared_windows": None, "windows": len(ref["tokens_by_window"])}
        for r in mine:
            k = stats.first_sampled_window(ref.get("temperatures_by_window", []), r.get("temperatures_by_window", []))
            a = ref["tokens_by_window"] if k is None else ref["tokens_by_window"][:k]
            b = r["tokens_by_window"] if k is None else r["tokens_by_window"][:k]
            compared = len(a)
            status["compared_windows"] = compared if status["compared_windows"] is None else \
                min(status["compared_windows"], compared)
            d = stats.find_divergence(a, b)
            if d is not None:
                status["status"] = "INVALID" if impl in exact else "differs"
                status["divergences"].append({"rep": r["rep"], **d})
        out[impl] = status
    return out


def gate_cell(g: dict) -> str:
    st = g.get("status", "unchecked")
    if st in ("identical", "reference"):
        n = g["windows"]
        shown = f"{g['compared_windows']} of {n} windows" if g.get("compared_windows") != n else \
            (f"all {n} windows" if n != 1 else "1 window")
        return ("reference" if st == "reference" else "identical") + f" ({shown})"
    if st == "differs":
        d = g["divergences"][0]
        return f"differ from window {d['window']} (not gated)"
    return st


def add_wer(runs: List[dict], audio: Audio, reference_impl: str = "openai") -> None:
    """wer: against the known text (repeated per file); wer_vs_openai: against openai-whisper's transcript."""
    ref = next((r for r in runs if r["impl"] == reference_impl and r.get("ok")), None)
    for r in runs:
        if not r.get("ok") or r.get("text") is None:
            continue
        if audio.text:
            r["wer"] = word_error_rate(" ".join([audio.text] * r.get("n_audio", 1)), r["text"])
        if ref is not None and words(ref["text"]):
            r["wer_vs_openai"] = word_error_rate(ref["text"], r["text"])


def summarize(runs: List[dict], duration: float) -> Dict[str, dict]:
    impls = list(dict.fromkeys(r["impl"] for r in runs))
    ok = {i: {r["rep"]: r for r in runs if r["impl"] == i and r.get("ok")} for i in impls}
    base_impl = next((i for i in impls if i in EXACT), None)
    base_wall = {k: r["wall_s"] for k, r in ok.get(base_impl, {}).items()}
    out = {}
    for i in impls:
        rs = ok[i]
        wall = {k: r["wall_s"] for k, r in rs.items()}
        out[i] = {
            "runs": len(rs), "failed": sum(1 for r in runs if r["impl"] == i and not r.get("ok")),
            "wall_s": stats.spread(wall.values()),
            "audio_s_per_s": stats.spread(duration * r.get("n_audio", 1) / r["wall_s"] for r in rs.values()),
            "wall_ratio_vs_max": stats.ratio_summary(wall, base_wall) if base_impl else None,
            "peak_rss_mb": stats.spread(r.get("maxrss_mb") for r in rs.values()),
            "cold_start_s": stats.spread(r.get("cold_start_s") for r in rs.values()),
            "cold_start_estimated": any(r.get("first_token_estimated") for r in rs.values()),
            "load_s": stats.spread(r.get("load_s") for r in rs.values()),
            "text_tokens": stats.median(sum(map(len, r["tokens_by_window"])) for r in rs.values()),
            "windows": stats.median(len(r["tokens_by_window"]) for r in rs.values()),
            "sampled_windows": stats.median(sum(1 for t in r.get("temperatures_by_window", []) if t > 0)
                                            for r in rs.values()),
            "wer": stats.median(r.get("wer") for r in rs.values()),
            "wer_vs_openai": stats.median(r.get("wer_vs_openai") for r in rs.values()),
        }
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(summary: Dict[str, dict], gates: Dict[str, dict]) -> str:
    head = ["implementation", "tokens vs openai-whisper", "wall s: median (min–max)", "audio s/s",
            "wall ÷ this project", "WER %", "WER % vs openai-whisper", "peak RSS MB", "cold start s",
            "text tokens, windows (sampled)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl, s in summary.items():
        runs = f"{s['runs']} run" + ("s" if s["runs"] != 1 else "") + (f", {s['failed']} failed" if s["failed"] else "")
        ratio = "1.00 (ref)" if impl in EXACT and s["wall_s"] else stats.fmt(s["wall_ratio_vs_max"])
        cold = stats.fmt(s["cold_start_s"]) + (" (est.)" if s["cold_start_estimated"] and s["cold_start_s"] else "")
        tokens = "-" if s["text_tokens"] is None else \
            f"{s['text_tokens']:.0f}, {s['windows']:.0f} ({s['sampled_windows'] or 0:.0f})"
        lines.append("| " + " | ".join([
            f"{LABELS.get(impl, impl)} [{runs}]", gate_cell(gates.get(impl, {})), stats.fmt(s["wall_s"]),
            stats.fmt(s["audio_s_per_s"], 1, False), ratio, _pct(s["wer"]), _pct(s["wer_vs_openai"]),
            stats.fmt(s["peak_rss_mb"], 0, False), cold, tokens]) + " |")
    return "\n".join(lines)


def block_title(block: dict) -> str:
    w = block["workload"]
    title = WORKLOAD_TITLES[w]
    if w == "batch":
        title += f" ({block['files']} files, batch size {block['batch_size']})"
    return f"{block['model']}, {block['audio']} ({block['audio_s']:.0f} s): {title}"


NOTES = ("tokens: text token ids against openai-whisper's, window by window, up to the first window either side "
         "decoded by sampling (temperature fallback); this project must be identical (INVALID otherwise), "
         "faster-whisper is compared by WER. wall: transcribe() of all the files, model loaded before; ratios: "
         "per repetition, median (min–max); cold start: process launch to first decoded token (est.: "
         "faster-whisper has no per-token hook: its first generate's start plus one average token); WER: against "
         "the spoken text (synthesized speech, jfk), and against openai-whisper's transcript. Many files: "
         "openai-whisper transcribes them one after the other (30 s grid: without timestamps, no conditioning), "
         "this project decodes all their 30 s chunks together, faster-whisper's BatchedInferencePipeline decodes "
         "one file's VAD speech chunks together, file after file.")


def run_real(args, wanted: List[str], pythons: Dict[str, str], out_dir: Path, run_child, run_checked, venv_tool,
             duration_of, Impl) -> List[dict]:
    """Every (model, audio, workload) block: interleaved repetitions, gate after the first, then the summary."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    workloads = [w for w in args.workloads.split(",") if w.strip() in WORKLOADS]
    audios = resolve_audios(args.audio or "lecture,long", out_dir, args.synth_seconds, duration_of)
    blocks: List[dict] = []
    for name in models:
        model = prepare_model(name, args.artifacts, out_dir, run_checked, venv_tool, int8="max-int8" in wanted)
        print(f"model {name}: ct2 {model.ct2}\n  artifacts {model.artifacts}\n  openai .pt {model.checkpoint}",
              flush=True)
        for audio in audios:
            for workload in workloads:
                names = workload_impls(workload, wanted)
                impls = [Impl(n, pythons["max" if n.startswith("max") else ("openai" if n == "openai" else "fw")],
                              "", impl_spec(n, model, workload, audio, args)) for n in names]
                for impl in impls:
                    impl.model = impl.extra.pop("model")
                tag = f"{name}-{audio.key}-{workload}"
                unchecked = {"max-batched": "VAD on (--batch-vad): openai-whisper has no VAD"} \
                    if workload == "batch" and args.batch_vad else {}
                runs: List[dict] = []
                options = {i.name: workload_options(workload, i.name, args.batch_vad) for i in impls}
                for rep in range(1, args.repeats + 1):
                    for impl in impls:  # interleaved: A B C A B C ...
                        print(f"[{tag} {rep}/{args.repeats}] {impl.name} ...", end=" ", flush=True)
                        r = run_child(impl, tag, rep, args, audio.path, out_dir, options=options[impl.name])
                        runs.append(r)
                        if r.get("ok"):
                            print(f"{r['wall_s']:.2f} s", flush=True)
                    if rep == 1:
                        for impl_name, st in gate(runs, unchecked=unchecked).items():
                            if st["status"] == "INVALID":
                                print(f"GATE {tag}: {impl_name} INVALID: tokens differ from openai-whisper's at "
                                      f"{stats.describe_divergence(st['divergences'][0])}", flush=True)
                gates = gate(runs, unchecked=unchecked)
                add_wer(runs, audio)
                blocks.append({
                    "model": name, "audio": audio.key, "audio_path": str(audio.path), "audio_s": audio.duration,
                    "workload": workload, "files": len(impls[0].extra["audios"]) if impls else 0,
                    "batch_size": args.batch_size, "known_text": audio.text is not None, "options": options,
                    "gate": gates, "summary": summarize(runs, audio.duration),
                    "runs": [{k: v for k, v in r.items() if k != "tokens_by_window"} for r in runs]})
    return blocks


def markdown(blocks: List[dict]) -> str:
    parts = []
    for block in blocks:
        parts.append(f"### {block_title(block)}\n\n{table(block['summary'], block['gate'])}")
        for impl, st in block["gate"].items():
            if st["status"] == "INVALID":
                for d in st["divergences"]:
                    parts.append(f"- {impl} INVALID (repetition {d['rep']}): {stats.describe_divergence(d)}")
    return "\n\n".join(parts) + ("\n\n" + NOTES if blocks else "")


def any_invalid(blocks: List[dict]) -> bool:
    return any(g["status"] == "INVALID" for b in blocks for g in b["gate"].values())
