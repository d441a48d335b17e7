"""`runtime transcribe AUDIO... --model artifacts/<name>`: openai-whisper's CLI, from prebuilt artifacts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

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


class OptionalInt(click.ParamType):
    name = "integer|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return int(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither an integer nor 'none'", param, ctx)


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
@click.option("--best-of", type=OptionalInt(), default=5, show_default=True,
              help="candidates when sampling with temperature > 0; 'none' samples one")
@click.option("--beam-size", type=OptionalInt(), default=5, show_default=True,
              help="beams of beam search at temperature 0; 'none' decodes greedily")
@click.option("--patience", type=float, default=None,
              help="beam search patience (arxiv:2204.05424); the default, 1.0, is conventional beam search")
@click.option("--length-penalty", type=float, default=None,
              help="alpha of the length penalty (arxiv:1609.08144) ranking the candidates; "
                   "default: divide the log-probability by the length")
@click.option("--suppress-tokens", default="-1", show_default=True,
              help="comma-separated token ids to suppress; -1 suppresses openai-whisper's default set")
@click.option("--initial-prompt", default=None, help="text to condition the first window on")
@click.option("--carry-initial-prompt", type=bool, default=False, show_default=True,
              help="prepend --initial-prompt to the prompt of every window, not just the first")
@click.option("--clip-timestamps", default="0", show_default=True,
              help="comma-separated start,end,start,end,... seconds of the clips to transcribe; "
                   "the last end defaults to the end of the file")
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
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="many-files mode: decode fixed 30 s chunks of all AUDIO files together, this many per batch "
                   "(no seeking by timestamps, no conditioning on previous text; see README)")
@click.option("--word-timestamps", type=bool, is_flag=False, flag_value=True, default=False, show_default=True,
              help="time each word from the cross-attention, and end segments at words (alone or True/False)")
@click.option("--prepend-punctuations", default=PREPEND_PUNCTUATIONS, show_default=True,
              help="with --word-timestamps, merge these punctuation symbols with the next word")
@click.option("--append-punctuations", default=APPEND_PUNCTUATIONS, show_default=True,
              help="with --word-timestamps, merge these punctuation symbols with the previous word")
@click.option("--highlight-words", type=bool, is_flag=False, flag_value=True, default=False, show_default=True,
              help="(requires --word-timestamps) underline each word as it is spoken in srt and vtt")
@click.option("--max-line-width", type=OptionalInt(), default=None,
              help="(requires --word-timestamps) the most characters in a subtitle line before breaking it")
@click.option("--max-line-count", type=OptionalInt(), default=None,
              help="(requires --word-timestamps) the most lines in a subtitle")
@click.option("--max-words-per-line", type=OptionalInt(), default=None,
              help="(requires --word-timestamps, no effect with --max-line-width) the most words in a subtitle")
@click.option("--hallucination-silence-threshold", type=OptionalFloat(), default=None,
              help="(requires --word-timestamps) skip silent periods longer than this many seconds "
                   "around a possible hallucination")
def transcribe(audio, model_dir, device, threads, output_dir, output_format, verbose, task, language, temperature,
               temperature_increment_on_fallback, best_of, beam_size, patience, length_penalty, suppress_tokens,
               initial_prompt, carry_initial_prompt,
               clip_timestamps, condition_on_previous_text, compression_ratio_threshold, logprob_threshold,
               no_speech_threshold, without_timestamps, max_initial_timestamp, sample_len, batch_windows,
               batch_size, **word_options) -> None:
    """Transcribe AUDIO files (any format ffmpeg reads) and write transcripts to --output-dir."""
    missing = [str(path) for path in audio if not path.is_file()]
    if missing:
        _fail(f"audio file not found: {missing[0]}")
    _check_clip_timestamps(clip_timestamps)
    word_timestamp_options, writer_options = _split_word_options(word_options)

    from .api import load_model, transcribe as transcribe_audio
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .writers import get_writer

    if temperature_increment_on_fallback is not None and temperature_increment_on_fallback > 0:
        import numpy as np

        # np.arange as openai-whisper's CLI does: the same floats (0.6000000000000001, ...) end up in
        # each segment's "temperature", so the JSON output matches byte for byte.
        temperatures = tuple(float(t) for t in np.arange(temperature, 1.0 + 1e-6, temperature_increment_on_fallback))
    else:
        temperatures = (temperature,)
    options = dict(task=task, language=language, temperature=temperatures, best_of=best_of, beam_size=beam_size,
                   patience=patience, length_penalty=length_penalty,
                   suppress_tokens=suppress_tokens, initial_prompt=initial_prompt,
                   carry_initial_prompt=carry_initial_prompt, clip_timestamps=clip_timestamps,
                   condition_on_previous_text=condition_on_previous_text,
                   compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
                   no_speech_threshold=no_speech_threshold, without_timestamps=without_timestamps,
                   max_initial_timestamp=max_initial_timestamp, batch_windows=batch_windows,
                   verbose=verbose, **word_timestamp_options)
    if sample_len is not None:
        options["sample_len"] = sample_len
    # bad decoding options (--beam-size 0, --patience with --beam-size none ...) fail before any work
    from .decoding import DecodingOptions
    from .longform import check_decode_options

    decode_options = {k: v for k, v in options.items()
                      if k in DecodingOptions.__dataclass_fields__ and k != "temperature"}
    try:
        check_decode_options(temperatures, decode_options)
    except DecodingError as exc:
        _fail(str(exc))

    try:
        model = load_model(model_dir, device=device, threads=threads or None)
    except ArtifactError as exc:
        _fail(str(exc))
    write = None  # made on first use: a run that fails everywhere leaves no output folder behind
    failed = 0
    if batch_size is not None:
        results, failed = _transcribe_batched(model, audio, batch_size, options)
    else:
        results = _transcribe_each(model, audio, options, transcribe_audio)
    for path, result in results:
        if result is None:
            failed += 1
            continue
        if write is None:
            output_dir.mkdir(parents=True, exist_ok=True)
            write = get_writer(output_format, str(output_dir))
        write(result, str(path), writer_options)
    if failed:
        sys.exit(1)


def _transcribe_each(model, audio, options, transcribe_audio):
    """(path, result or None) per file, as each finishes; a failure is one line on stderr."""
    from .audio import AudioError
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .tokenizer import TokenizerError

    for path in audio:
        try:
            yield path, transcribe_audio(model, path, **options)
        except (AudioError, DecodingError, TokenizerError, ArtifactError) as exc:
            click.echo(f"error: {path}: {_one_line(exc)}", err=True)
            yield path, None


# transcribe's options the many-files mode does not have: chunks are fixed and independent
_NOT_BATCHED = {"word_timestamps": False, "clip_timestamps": "0", "carry_initial_prompt": False,
                "hallucination_silence_threshold": None}


# transcribe_batch's own arguments besides the DecodingOptions fields
_BATCH_ARGUMENTS = ("temperature", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
                    "initial_prompt")


def _transcribe_batched(model, audio, batch_size: int, options: dict):
    """--batch-size: every file's chunks through runtime.transcribe_batch; files that cannot be read are
    reported and left out. Returns ([(path, result)], number of failed files)."""
    from .api import transcribe_batch
    from .audio import AudioError, load_audio
    from .decoding import DecodingError
    from .tokenizer import TokenizerError

    context = click.get_current_context()
    for name, plain in _NOT_BATCHED.items():
        if options.get(name, plain) != plain:
            _fail(f"--{name.replace('_', '-')} does not work with --batch-size (fixed, independent 30 s chunks)")
    if options["condition_on_previous_text"] and \
            context.get_parameter_source("condition_on_previous_text") != click.core.ParameterSource.DEFAULT:
        _fail("--condition-on-previous-text True does not work with --batch-size (chunks are decoded together)")
    from .decoding import DecodingOptions

    batched_options = {k: v for k, v in options.items()
                       if k in DecodingOptions.__dataclass_fields__ or k in _BATCH_ARGUMENTS}
    loaded, failed = [], 0
    for path in audio:
        try:
            loaded.append((path, load_audio(str(path))))
        except AudioError as exc:
            click.echo(f"error: {path}: {_one_line(exc)}", err=True)
            failed += 1
    if not loaded:
        return [], failed
    try:
        results = transcribe_batch(model, [samples for _, samples in loaded], batch_size=batch_size,
                                   **batched_options)
    except (DecodingError, TokenizerError) as exc:
        _fail(str(exc))
    return [(path, result) for (path, _), result in zip(loaded, results)], failed


@main.command("detect-language")
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="artifact folder made by make convert and make compile, e.g. artifacts/tiny")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads; 0 lets MAX choose")
@click.option("--top", type=int, default=5, show_default=True, help="how many of the most probable languages to print")
@click.option("--json", "as_json", is_flag=True,
              help="print every language's probability as JSON: [{audio, language, probabilities}, ...]")
def detect_language_command(audio, model_dir, device, threads, top, as_json) -> None:
    """Detect the spoken language of AUDIO files from their first 30 s, as whisper.transcribe does."""
    import json

    missing = [str(path) for path in audio if not path.is_file()]
    if missing:
        _fail(f"audio file not found: {missing[0]}")
    if top < 1:
        _fail(f"--top must be 1 or more, got {top}")

    from .api import load_model
    from .audio import AudioError
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .tokenizer import LANGUAGES, TokenizerError

    try:
        model = load_model(model_dir, device=device, threads=threads or None)
    except ArtifactError as exc:
        _fail(str(exc))
    if not model.is_multilingual:
        # openai-whisper's detect_language raises here too: the model has no language tokens
        _fail(f"{model_dir} is an English-only model: it has no language tokens to detect a language with")
    results = []
    failed = 0
    for path in audio:
        try:
            probabilities = _language_probabilities(model, path)
        except (AudioError, DecodingError, TokenizerError, ArtifactError) as exc:
            click.echo(f"error: {path}: {_one_line(exc)}", err=True)
            failed += 1
            continue
        language = max(probabilities, key=probabilities.get)
        results.append({"audio": str(path), "language": language, "probabilities": probabilities})
        if not as_json:
            click.echo(f"{path}: {LANGUAGES[language].title()} ({language})")
            for code in sorted(probabilities, key=probabilities.get, reverse=True)[:top]:
                click.echo(f"  {code:<4} {probabilities[code]:.6f}  {LANGUAGES[code].title()}")
    if as_json and results:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
    if failed:
        sys.exit(1)


def _language_probabilities(model, path: Path) -> dict[str, float]:
    """Each language's probability from the first 30 s window, computed as whisper.transcribe does
    before decoding: the log-mel of the whole file (30 s of silence appended), cut to 3000 frames."""
    from .audio import N_FRAMES, N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
    from .decoding import detect_language

    mel = log_mel_spectrogram(load_audio(path), model.mel_filters, padding=N_SAMPLES)
    _, probabilities = detect_language(model, pad_or_trim(mel, N_FRAMES), tokenizer_path=str(model.tokenizer_path))
    return probabilities


def _check_clip_timestamps(clip_timestamps: str) -> None:
    """Fail on what openai-whisper would crash on (a non-number) or silently misread (a negative
    or non-finite time, which would slice the spectrogram from its end)."""
    import math

    for text in clip_timestamps.split(",") if clip_timestamps else []:
        try:
            seconds = float(text)
        except ValueError:
            _fail(f"--clip-timestamps takes comma-separated seconds (start,end,start,end,...), got {text!r}")
        if not math.isfinite(seconds) or seconds < 0:
            _fail(f"--clip-timestamps must be seconds from the start of the audio (>= 0), got {text!r}")


def _split_word_options(options: dict) -> tuple[dict, dict]:
    """(transcribe's word-timestamp options, the writers' subtitle options), checked as openai-whisper's
    CLI checks them: subtitle options need word timestamps; some combinations only warn."""
    writer_options = {name: options.pop(name)
                      for name in ("highlight_words", "max_line_count", "max_line_width", "max_words_per_line")}
    if not options["word_timestamps"]:
        for name, value in writer_options.items():
            if value:
                _fail(f"--{name.replace('_', '-')} requires --word-timestamps")
        if options["hallucination_silence_threshold"] is not None:
            _warn("--hallucination-silence-threshold has no effect without --word-timestamps")
    if writer_options["max_line_count"] and not writer_options["max_line_width"]:
        _warn("--max-line-count has no effect without --max-line-width")
    if writer_options["max_words_per_line"] and writer_options["max_line_width"]:
        _warn("--max-words-per-line has no effect with --max-line-width")
    return options, writer_options


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str) -> None:
    click.echo(f"error: {_one_line(Exception(message))}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
