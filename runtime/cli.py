"""`runtime transcribe AUDIO... --model artifacts/<name>`: openai-whisper's CLI, from prebuilt artifacts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

OUTPUT_FORMATS = ["txt", "vtt", "srt", "tsv", "json", "all"]


def _optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


class OptionalFloat(click.ParamType):
    name = "float|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        try:
            return _optional_float(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


@click.group()
def main() -> None:
    """Whisper speech recognition from prebuilt MAX artifacts."""


@main.command()
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="artifact folder made by make convert and make compile, e.g. artifacts/tiny")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads; 0 lets MAX choose")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--output-format", "-f", type=click.Choice(OUTPUT_FORMATS), default="all", show_default=True)
@click.option("--verbose", type=bool, default=True, show_default=True,
              help="print segments as they are decoded; False shows a progress bar on stderr instead")
@click.option("--task", type=click.Choice(["transcribe", "translate"]), default="transcribe", show_default=True)
@click.option("--language", default=None, help="spoken language (name or code); detected when omitted")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--temperature-increment-on-fallback", type=OptionalFloat(), default=0.2, show_default=True,
              help="added to the temperature after each failed window; 'none' disables fallback")
@click.option("--best-of", type=int, default=5, show_default=True, help="candidates when sampling with temperature > 0")
@click.option("--suppress-tokens", default="-1", show_default=True,
              help="comma-separated token ids to suppress; -1 suppresses openai-whisper's default set")
@click.option("--initial-prompt", default=None, help="text to condition the first window on")
@click.option("--condition-on-previous-text", type=bool, default=True, show_default=True)
@click.option("--compression-ratio-threshold", type=OptionalFloat(), default=2.4, show_default=True)
@click.option("--logprob-threshold", type=OptionalFloat(), default=-1.0, show_default=True)
@click.option("--no-speech-threshold", type=OptionalFloat(), default=0.6, show_default=True)
@click.option("--without-timestamps", is_flag=True, help="decode text only, one segment per 30 s window")
@click.option("--max-initial-timestamp", type=float, default=1.0, show_default=True)
@click.option("--sample-len", type=int, default=None, help="maximum tokens sampled per window (default n_text_ctx/2)")
@click.option("--batch-windows", type=click.IntRange(min=1), default=8, show_default=True,
              help="windows decoded as one batch where they cannot depend on each other "
                   "(--without-timestamps, no conditioning, no prompt); same result, 1 disables")
def transcribe(audio, model_dir, device, threads, output_dir, output_format, verbose, task, language, temperature,
               temperature_increment_on_fallback, best_of, suppress_tokens, initial_prompt,
               condition_on_previous_text, compression_ratio_threshold, logprob_threshold,
               no_speech_threshold, without_timestamps, max_initial_timestamp, sample_len, batch_windows) -> None:
    """Transcribe AUDIO files (any format ffmpeg reads) and write transcripts to --output-dir."""
    missing = [str(path) for path in audio if not path.is_file()]
    if missing:
        _fail(f"audio file not found: {missing[0]}")

    from .api import load_model, transcribe as transcribe_audio
    from .audio import AudioError
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .tokenizer import TokenizerError
    from .writers import get_writer

    if temperature_increment_on_fallback is not None and temperature_increment_on_fallback > 0:
        import numpy as np

        # np.arange as openai-whisper's CLI does: the same floats (0.6000000000000001, ...) end up in
        # each segment's "temperature", so the JSON output matches byte for byte.
        temperatures = tuple(float(t) for t in np.arange(temperature, 1.0 + 1e-6, temperature_increment_on_fallback))
    else:
        temperatures = (temperature,)
    options = dict(task=task, language=language, temperature=temperatures, best_of=best_of,
                   suppress_tokens=suppress_tokens, initial_prompt=initial_prompt,
                   condition_on_previous_text=condition_on_previous_text,
                   compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
                   no_speech_threshold=no_speech_threshold, without_timestamps=without_timestamps,
                   max_initial_timestamp=max_initial_timestamp, batch_windows=batch_windows,
                   verbose=verbose)
    if sample_len is not None:
        options["sample_len"] = sample_len

    try:
        model = load_model(model_dir, device=device, threads=threads or None)
    except ArtifactError as exc:
        _fail(str(exc))
    write = None  # made on first use: a run that fails everywhere leaves no output folder behind
    failed = 0
    for path in audio:
        try:
            result = transcribe_audio(model, path, **options)
        except (AudioError, DecodingError, TokenizerError, ArtifactError) as exc:
            click.echo(f"error: {path}: {_one_line(exc)}", err=True)
            failed += 1
            continue
        if write is None:
            output_dir.mkdir(parents=True, exist_ok=True)
            write = get_writer(output_format, str(output_dir))
        write(result, str(path), {"max_line_width": None, "max_line_count": None, "highlight_words": False,
                                   "max_words_per_line": None})
    if failed:
        sys.exit(1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str) -> None:
    click.echo(f"error: {_one_line(Exception(message))}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
