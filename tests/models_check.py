"""Real-dimension check of official Whisper models, without downloading them.

    make models-check MODELS="base small"        (or: python tests/models_check.py base small)

For each name: a seeded random checkpoint at the model's official dims (fp16, as openai publishes
them; tests/checkpoints.py), `converter convert` (which validates against openai-whisper's torch
model), `graph-builders compile --device cpu`, then the same inputs through openai-whisper's torch
model and through the runtime, each in its own process: the encoder output on 30 s of
synthesized speech, the decoder logits of a forced token sequence (prefill, then steps), a greedy
decode of the window (near-ties reported as in tests/test_transcribe_parity.py) and, for
multilingual models, the language probabilities. Every stage runs in a child process, timed, with
its peak memory (its own max RSS, from wait4). Writes summary.json and summary.md.

Memory: large-v3's random checkpoint is 3 GB and openai-whisper's fp32 copy of it 6 GB; the
stages run one at a time so the peak is the largest stage's, not their sum.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

BIN = Path(sys.executable).parent
# float32 on both sides, different summation order; the converter's own bound (its observed
# differences, like these, are orders of magnitude smaller).
TOLERANCE = 1e-3
SAMPLE_LEN = 48  # greedy tokens decoded from the window
TEXT = " The quick brown fox jumps over the lazy dog near the quiet river bank."


class StageError(Exception):
    pass


def run_stage(name: str, command: list[str], log) -> dict:
    """Run one stage in a child process: wall time, its own peak RSS, and stderr's tail on failure."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen(command, stdout=devnull, stderr=subprocess.PIPE)
        stderr = process.stderr.read()  # the child's stderr until it exits (small: logs, one-line errors)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stage = {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    log(f"  {name}: {stage['wall_s']} s, peak {stage['peak_rss_mb']} MB")
    if process.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise StageError(f"{name} failed ({process.returncode}): {' | '.join(tail)}")
    return stage


def inputs_for(model_dir: Path, speech: Path) -> dict:
    """The window's mel (the runtime's numpy log-mel with the model's filters) and forced tokens."""
    from runtime.audio import load_audio, load_mel_filters, log_mel_spectrogram, pad_or_trim
    from runtime.tokenizer import get_tokenizer

    model = json.loads((model_dir / "model.json").read_text())
    filters = load_mel_filters(model_dir / model["mel_filters"]["file"], model["dims"]["n_mels"])
    mel = pad_or_trim(log_mel_spectrogram(load_audio(speech), filters), 3000)
    tokenizer = get_tokenizer(model_dir / model["tokenizer"]["file"], model["is_multilingual"],
                              num_languages=model["num_languages"], language="en", task="transcribe")
    tokens = list(tokenizer.sot_sequence_including_notimestamps) + tokenizer.encode(TEXT)
    return {"mel": mel.astype(np.float32), "tokens": np.array([tokens], dtype=np.int64),
            "multilingual": np.array(model["is_multilingual"])}


def decoding_options(multilingual: bool):
    return dict(language="en" if multilingual else None, without_timestamps=True, sample_len=SAMPLE_LEN,
                temperature=0.0)


# -------------------------------------------------------------------------- child processes


def reference_outputs(checkpoint: str, inputs_path: str, out_path: str) -> None:
    """openai-whisper's torch model (fp32, as whisper.load_model on CPU)."""
    import pytest
    import torch
    import whisper
    from test_transcribe_parity import record_reference
    from whisper.model import ModelDimensions, Whisper

    inputs = dict(np.load(inputs_path))
    data = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)  # not a second 3 GB copy
    model = Whisper(ModelDimensions(**data["dims"]))
    model.load_state_dict(data["model_state_dict"])
    model = model.float().eval()
    del data
    out = {}
    mel = torch.from_numpy(inputs["mel"])
    with torch.no_grad():
        started = time.perf_counter()
        audio = model.encoder(mel[None])
        out["encode_s"] = time.perf_counter() - started
        out["encoder"] = audio.numpy()
        out["logits"] = model.decoder(torch.from_numpy(inputs["tokens"]), audio).numpy()
    multilingual = bool(inputs["multilingual"])
    if multilingual:
        _, probs = whisper.detect_language(model, mel)
        out["language_probs"] = np.array([probs[code] for code in sorted(probs)])  # its dict is in hash order
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = record_reference(monkeypatch)
        started = time.perf_counter()
        model.decode(mel, whisper.DecodingOptions(**decoding_options(multilingual), fp16=False))  # recorded
        out["decode_s"] = time.perf_counter() - started
    out["tokens"] = np.array(calls[0].tokens, dtype=np.int64)
    out["margins"] = np.array(calls[0].margins, dtype=np.float64)
    np.savez(out_path, **out)


def runtime_outputs(model_dir: str, inputs_path: str, out_path: str) -> None:
    """This project's runtime on the compiled artifacts (never imports torch)."""
    import runtime
    from runtime.decoding import DecodingOptions, decode, detect_language

    inputs = dict(np.load(inputs_path))
    out = {}
    started = time.perf_counter()
    model = runtime.load_model(model_dir, device="cpu")
    out["load_s"] = time.perf_counter() - started
    mel = inputs["mel"]
    started = time.perf_counter()
    features = model.encode(mel[None])
    out["encode_s"] = time.perf_counter() - started
    out["encoder"] = model._to_host(features.buffer)
    tokens = inputs["tokens"]
    prefix = tokens.shape[1] // 2
    session = model.decoder(features)  # the prefill graph for half the tokens, the step graph for the rest
    logits = [session.prefill(tokens[:, :prefix], list(range(prefix)))[0]]
    logits += [session.step(tokens[:, i])[0][None] for i in range(prefix, tokens.shape[1])]
    out["logits"] = np.concatenate(logits)[None]
    multilingual = bool(inputs["multilingual"])
    if multilingual:
        _, probs = detect_language(model, mel)
        out["language_probs"] = np.array([probs[code] for code in sorted(probs)])
    started = time.perf_counter()
    result = decode(model, mel, DecodingOptions(**decoding_options(multilingual)))
    out["decode_s"] = time.perf_counter() - started
    out["tokens"] = np.array(result.tokens, dtype=np.int64)
    np.savez(out_path, **out)


# --------------------------------------------------------------------------------- one model


def compare_tokens(reference_tokens, margins, our_tokens) -> dict:
    """Identical, a near-tie (either pick is right: the rest is not comparable), or a mismatch."""
    from test_transcribe_parity import TIE_EPSILON

    reference_tokens, our_tokens = list(map(int, reference_tokens)), list(map(int, our_tokens))
    if reference_tokens == our_tokens:
        return {"tokens": len(reference_tokens), "identical": True, "tie": None, "passed": True}
    index = next((i for i, (a, b) in enumerate(zip(reference_tokens, our_tokens)) if a != b),
                 min(len(reference_tokens), len(our_tokens)))
    margin = float(margins[index]) if index < len(margins) else float("inf")
    tie = {"index": index, "margin": margin}
    return {"tokens": len(reference_tokens), "identical": False, "tie": tie, "passed": margin < TIE_EPSILON}


def check_model(name: str, work_dir: Path, keep: bool = False, speech: Path | None = None, log=print) -> dict:
    from audio_samples import synthesize_speech
    from checkpoints import OFFICIAL_DIMS

    if name not in OFFICIAL_DIMS:
        raise StageError(f"unknown model {name!r}; one of {', '.join(OFFICIAL_DIMS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    speech = speech or synthesize_speech(work_dir / "speech-29s.wav", n_sentences=6)
    dims = OFFICIAL_DIMS[name]
    checkpoint = work_dir / f"{name}-random.pt"
    artifacts = work_dir / "artifacts"
    model_dir = artifacts / f"{name}-random"
    result = {"model": name, "dims": dims, "stages": {}, "passed": False}
    stages = result["stages"]
    log(f"{name}:")
    try:
        stages["checkpoint"] = run_stage("random checkpoint", [sys.executable, str(TESTS / "checkpoints.py"),
                                                               str(checkpoint), "0", name], log)
        result["checkpoint_mb"] = round(checkpoint.stat().st_size / 2**20)
        stages["convert"] = run_stage("convert + validate", [str(BIN / "converter"), "convert", "--checkpoint",
                                                             str(checkpoint), "--name", model_dir.name,
                                                             "--out-dir", str(artifacts), "--force"], log)
        validation = json.loads((model_dir / "validation.json").read_text())
        result["validation"] = {"encoder_max_abs": validation["encoder"]["max_abs"],
                                "logits_max_abs": validation["logits"]["max_abs"], "passed": validation["passed"]}
        stages["compile"] = run_stage("compile (cpu)", [str(BIN / "graph-builders"), "compile", str(model_dir),
                                                        "--device", "cpu"], log)
        manifest = json.loads((model_dir / "cpu" / "manifest.json").read_text())
        result["compile_s"] = {g: entry.get("compile_seconds") for g, entry in manifest["graphs"].items()}

        inputs_path, reference_path, ours_path = (work_dir / f"{name}-{k}.npz" for k in ("inputs", "torch", "ours"))
        np.savez(inputs_path, **inputs_for(model_dir, speech))
        me = str(Path(__file__).resolve())
        stages["torch"] = run_stage("openai-whisper (torch fp32)", [sys.executable, me, "--reference", str(checkpoint),
                                                                    str(inputs_path), str(reference_path)], log)
        stages["runtime"] = run_stage("runtime (MAX, cpu)", [sys.executable, me, "--runtime", str(model_dir),
                                                            str(inputs_path), str(ours_path)], log)
        reference, ours = dict(np.load(reference_path)), dict(np.load(ours_path))
        result["encoder_max_abs"] = float(np.abs(ours["encoder"] - reference["encoder"]).max())
        result["logits_max_abs"] = float(np.abs(ours["logits"] - reference["logits"]).max())
        result["decode"] = compare_tokens(reference["tokens"], reference["margins"], ours["tokens"])
        result["seconds"] = {"runtime_load": float(ours["load_s"]), "runtime_encode": float(ours["encode_s"]),
                             "runtime_decode": float(ours["decode_s"]), "torch_encode": float(reference["encode_s"]),
                             "torch_decode": float(reference["decode_s"])}
        checks = [result["validation"]["passed"], result["encoder_max_abs"] <= TOLERANCE,
                  result["logits_max_abs"] <= TOLERANCE, result["decode"]["passed"]]
        if "language_probs" in reference:
            result["language_probs_max_abs"] = float(np.abs(ours["language_probs"] - reference["language_probs"]).max())
            checks.append(result["language_probs_max_abs"] <= 1e-4)
        result["passed"] = all(checks)
    except (StageError, OSError, KeyError, ValueError) as exc:
        result["error"] = " ".join(str(exc).split())
        log(f"  error: {result['error']}")
    finally:
        if not keep:
            checkpoint.unlink(missing_ok=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    log(f"  {'passed' if result['passed'] else 'FAILED'}: encoder {result.get('encoder_max_abs', float('nan')):.2e}, "
        f"logits {result.get('logits_max_abs', float('nan')):.2e}, decode {result.get('decode')}")
    return result


def markdown(results: list[dict]) -> str:
    def stage(r, key):
        s = r["stages"].get(key)
        return f"{s['wall_s']:.0f} s, {s['peak_rss_mb'] / 1024:.1f} GB" if s else "-"

    def number(r, key):
        return f"{r[key]:.1e}" if key in r else "-"

    def tokens(r):
        decode = r.get("decode")
        if not decode:
            return "-"
        if decode["identical"]:
            return f"{decode['tokens']} identical"
        tie = decode["tie"]
        verdict = "near-tie" if decode["passed"] else "DIFFER"
        return f"{verdict} at token {tie['index']} (reference margin {tie['margin']:.1e})"

    def graphs(r):  # from the manifest: what compiling took when it last ran (not skipped as current)
        seconds = [s for s in (r.get("compile_s") or {}).values() if s is not None]
        return f"{sum(seconds):.0f} s" if seconds else "-"

    lines = ["| model | checkpoint MB | convert + validate | compile (cpu) | graphs' compile time | torch reference | "
             "runtime | encoder max abs | logits max abs | greedy tokens | language probs max abs | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(" | ".join(["", r["model"], str(r.get("checkpoint_mb", "-")), stage(r, "convert"),
                                 stage(r, "compile"), graphs(r), stage(r, "torch"), stage(r, "runtime"),
                                 number(r, "encoder_max_abs"), number(r, "logits_max_abs"), tokens(r),
                                 number(r, "language_probs_max_abs"),
                                 "yes" if r["passed"] else f"NO {r.get('error', '')}".strip(), ""]).strip())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["base"])
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/models-check"))
    parser.add_argument("--keep", action="store_true", help="keep each model's checkpoint and artifacts")
    parser.add_argument("--reference", nargs=3, metavar=("CHECKPOINT", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--runtime", nargs=3, metavar=("MODEL_DIR", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        reference_outputs(*args.reference)
        return 0
    if args.runtime:
        runtime_outputs(*args.runtime)
        return 0

    from checkpoints import OFFICIAL_DIMS

    unknown = [m for m in args.models if m not in OFFICIAL_DIMS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; one of {', '.join(OFFICIAL_DIMS)}", file=sys.stderr)
        return 2
    results = []
    for name in args.models:
        results.append(check_model(name, args.work_dir, keep=args.keep))
        # after each model, so an interrupted run keeps what it measured
        (args.work_dir / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.work_dir / "summary.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.work_dir / 'summary.json'} and {args.work_dir / 'summary.md'}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
