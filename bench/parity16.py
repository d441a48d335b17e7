"""Parity report for 16-bit decoder weights on an fp32 checkpoint: `python -m bench.parity16`.

openai's checkpoints are fp16 values, so the default artifacts keep them in fp16 and stay exact. A
fine-tune saved in fp32 is exact only with fp32 decoder weights; `--decoder-weights fp16` rounds
them (half the bytes a token). This measures what that rounding costs on the bench workload: the
peers' checkpoint moved off the fp16 grid (fp32 values, seeded noise of 1e-3), converted, compiled
with rounded decoder weights, and decoded next to openai-whisper's torch fp32 model on the same fp32
weights. Reported: per window, how many tokens agree before the first difference, and in all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = Path.home() / ".cache" / "whisper-peers" / "models" / "tiny-random.pt"
DEFAULT_AUDIO = REPO.parent / "shared" / "audio" / "lecture-en.flac"
OPTIONS = dict(language="en", without_timestamps=True, condition_on_previous_text=False, temperature=0.0,
               sample_len=220)


def fp32_variant(checkpoint: Path, out: Path, noise: float = 1e-3, seed: int = 1) -> Path:
    import torch

    data = torch.load(checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    data["model_state_dict"] = {name: t.float() + noise * torch.randn(t.shape, generator=generator)
                                for name, t in data["model_state_dict"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, out)
    return out


def window_tokens(result: dict) -> list[list[int]]:
    windows: dict[int, list[int]] = {}
    for segment in result["segments"]:
        windows.setdefault(segment["seek"], []).extend(segment["tokens"])
    return [windows[k] for k in sorted(windows)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "parity16.json")
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.audio):
        if not path.is_file():
            sys.exit(f"parity16: {path} not found (run ../shared/peers/setup, or pass --checkpoint/--audio)")

    name = "parity16-fp32"
    checkpoint = fp32_variant(args.checkpoint, args.artifacts / "parity16-inputs" / f"{name}.pt")
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "converter", "convert", "--checkpoint", checkpoint, "--name", name,
                    "--out-dir", args.artifacts], check=True)
    subprocess.run([bin_dir / "graph-builders", "compile", args.artifacts / name, "--device", "cpu",
                    "--decoder-weights", "fp16"], check=True)

    import whisper

    import runtime

    model = runtime.load_model(args.artifacts / name)
    started = time.perf_counter()
    ours = runtime.transcribe(model, str(args.audio), batch_windows=1, **OPTIONS)
    ours_s = time.perf_counter() - started
    reference_model = whisper.load_model(str(checkpoint), device="cpu")
    started = time.perf_counter()
    reference = whisper.transcribe(reference_model, str(args.audio), fp16=False, verbose=None, **OPTIONS)
    reference_s = time.perf_counter() - started

    windows = []
    for mine, theirs in zip(window_tokens(ours), window_tokens(reference)):
        prefix = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        windows.append({"tokens": len(theirs), "agree_before_first_difference": prefix,
                        "same_position_agreement": sum(a == b for a, b in zip(mine, theirs)) / max(len(theirs), 1)})
    total = sum(w["tokens"] for w in windows)
    report = {"checkpoint": str(checkpoint), "audio": str(args.audio), "options": OPTIONS,
              "decoder_weights": "fp16 (rounded from fp32)", "windows": windows,
              "identical_windows": sum(w["agree_before_first_difference"] == w["tokens"] for w in windows),
              "tokens_before_first_difference": sum(w["agree_before_first_difference"] for w in windows),
              "tokens": total, "ours_wall_s": round(ours_s, 2), "openai_whisper_fp32_wall_s": round(reference_s, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"16-bit decoder weights on an fp32 checkpoint: {report['identical_windows']}/{len(windows)} windows "
          f"identical to openai-whisper fp32; {report['tokens_before_first_difference']}/{total} tokens agree "
          f"before each window's first difference; ours {ours_s:.2f} s, openai-whisper {reference_s:.2f} s "
          f"(one window at a time) -> {args.out}")


if __name__ == "__main__":
    main()
