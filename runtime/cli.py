"""`runtime transcribe AUDIO... --model artifacts/<name>`: openai-whisper's CLI, from prebuilt artifacts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .click_types import OptionalFloat, OptionalInt, compute_type_option
from .options import SUBTITLE_OPTIONS
from .timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

OUTPUT_FORMATS = ["txt", "vtt", "srt", "tsv", "json", "all"]


@click.group()
def main() -> None:
    """Whisper speech recognition from prebuilt MAX artifacts."""


@main.command()
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="artifact folder made by make convert and make compile, e.g. artifacts/tiny")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="CPU threads; 0 lets MAX choose")
@compute_type_option
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
              help="many-files mode: decode fixed 30 s chunks (with --vad-filter: speech chunks) of all AUDIO "
                   "files together, this many chunks per batch, each with its beams (no seeking by timestamps, "
                   "no conditioning on previous text; see README)")
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
@click.option("--vad-filter", type=bool, is_flag=False, flag_value=True, default=False, show_default=True,
              help="transcribe only the speech Silero VAD finds, with timestamps on the audio's timeline "
                   "(faster-whisper's vad_filter; needs onnxruntime and the VAD model: pip install '.[vad]')")
@click.option("--vad-threshold", type=float, default=None,
              help="(requires --vad-filter) windows with a speech probability at least this are speech [0.5]")
@click.option("--vad-neg-threshold", type=float, default=None,
              help="(requires --vad-filter) windows below this are silence; in between continue what came "
                   "before [threshold - 0.15, at least 0.01]")
@click.option("--vad-min-speech-duration-ms", type=float, default=None,
              help="(requires --vad-filter) drop speech chunks not longer than this [0]")
@click.option("--vad-max-speech-duration-s", type=float, default=None,
              help="(requires --vad-filter) cut longer speech at its last silence of 98 ms or more "
                   "[inf; 30, and at most 30, with --batch-size]")
@click.option("--vad-min-silence-duration-ms", type=float, default=None,
              help="(requires --vad-filter) silence that ends a speech chunk [2000; 160 with --batch-size]")
@click.option("--vad-speech-pad-ms", type=float, default=None,
              help="(requires --vad-filter) padding added to each side of a speech chunk [400]")
def transcribe(audio, model_dir, device, compute_type, threads, output_dir, output_format, verbose, task, language, temperature,
               temperature_increment_on_fallback, best_of, beam_size, patience, length_penalty, suppress_tokens,
               initial_prompt, carry_initial_prompt,
               clip_timestamps, condition_on_previous_text, compression_ratio_threshold, logprob_threshold,
               no_speech_threshold, without_timestamps, max_initial_timestamp, sample_len, batch_windows,
               batch_size, **word_options) -> None:
    """Transcribe AUDIO files (any format ffmpeg reads) and write transcripts to --output-dir."""
    from .options import OptionsError, TranscribeOptions, check_subtitle_options, temperature_schedule

    missing = [str(path) for path in audio if not path.is_file()]
    if missing:
        _fail(f"audio file not found: {missing[0]}")
    writer_options = {name: word_options.pop(name) for name in SUBTITLE_OPTIONS}
    vad_options = _vad_options(word_options, batched=batch_size is not None)
    options = dict(task=task, language=language, best_of=best_of, beam_size=beam_size,
                   patience=patience, length_penalty=length_penalty,
                   suppress_tokens=suppress_tokens, initial_prompt=initial_prompt,
                   carry_initial_prompt=carry_initial_prompt, clip_timestamps=clip_timestamps,
                   condition_on_previous_text=condition_on_previous_text,
                   compression_ratio_threshold=compression_ratio_threshold, logprob_threshold=logprob_threshold,
                   no_speech_threshold=no_speech_threshold, without_timestamps=without_timestamps,
                   max_initial_timestamp=max_initial_timestamp, batch_windows=batch_windows,
                   verbose=verbose, **word_options)
    if sample_len is not None:
        options["sample_len"] = sample_len
    options.update(vad_options)
    # every option checked before any work, by the same rules as the Python API and the server
    try:
        options["temperature"] = temperature_schedule(temperature, temperature_increment_on_fallback)
        TranscribeOptions.from_kwargs(**options)
        for warning in check_subtitle_options(options["word_timestamps"], options["hallucination_silence_threshold"],
                                              writer_options):
            _warn(_flags(warning))
    except OptionsError as exc:
        # options this command always named by their flags keep doing so; decoding options keep
        # their keyword names, as openai-whisper's messages have them
        _fail(_flags(str(exc)) if exc.param in _FLAG_WORDED else str(exc))
    _check_output_dir(output_dir)

    from .engine import ArtifactError, limit_threads

    try:
        # first, so that the prefetch's thread and its ffmpeg keep to the CPUs asked for as well
        limit_threads(threads or None)
    except ArtifactError as exc:
        _fail(str(exc))
    from .api import load_model, prefetch_log_mel, transcribe as transcribe_audio
    from .writers import get_writer

    # the first file's log-mel is made while the model loads (not with VAD, whose pass over the audio
    # comes first, nor with --batch-size, which reads every file itself)
    first_mel = prefetch_log_mel(model_dir, audio[0]) if batch_size is None and not vad_options else None

    try:
        model = load_model(model_dir, device=device, threads=threads or None, compute_type=compute_type)
    except ArtifactError as exc:
        _fail(str(exc))
    write = None  # made on first use: a run that fails everywhere leaves no output folder behind
    failed = 0
    if batch_size is not None:
        results, failed = _transcribe_batched(model, audio, batch_size, options)
    else:
        results = _transcribe_each(model, audio, options, transcribe_audio, first_mel)
    for path, result in results:
        if result is None:
            failed += 1
            continue
        try:
            if write is None:
                output_dir.mkdir(parents=True, exist_ok=True)
                write = get_writer(output_format, str(output_dir))
            write(result, str(path), writer_options)
        except OSError as exc:  # e.g. the disk filled up, or the folder was removed meanwhile
            _fail(f"cannot write the transcript of {path} to {output_dir}: {exc.strerror or exc}")
    if failed:
        sys.exit(1)


def _vad_options(options: dict, batched: bool) -> dict:
    """Pops the --vad-* options; returns {} without --vad-filter (the default path gets nothing new), else
    {"vad_filter": True, "vad_parameters": the parameters given}, checked here so that a bad value fails
    before any work, in terms of this command's flags."""
    from .batched import batched_vad_options
    from .vad import VadError, VadOptions

    vad_filter = options.pop("vad_filter")
    parameters = {name: options.pop(f"vad_{name}") for name in VadOptions.names()}
    parameters = {name: value for name, value in parameters.items() if value is not None}
    if not vad_filter:
        if parameters:
            _fail(f"--vad-{next(iter(parameters)).replace('_', '-')} requires --vad-filter")
        return {}
    try:
        (batched_vad_options if batched else VadOptions.from_parameters)(parameters)
    except VadError as exc:
        import re

        names = "|".join(VadOptions.names())
        _fail(re.sub(rf"(?:VAD (?:parameter )?)?\b({names})\b", lambda m: f"--vad-{m.group(1).replace('_', '-')}",
                     str(exc)))
    return {"vad_filter": True, "vad_parameters": parameters}


_FLAG_WORDED = {"clip_timestamps", "temperature_increment_on_fallback", *SUBTITLE_OPTIONS}


def _flags(message: str) -> str:
    """A message about keywords (clip_timestamps) as one about this command's flags (--clip-timestamps)."""
    import re

    from .options import TranscribeOptions

    names = TranscribeOptions.names() | set(SUBTITLE_OPTIONS) | {"temperature_increment_on_fallback"}
    return re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b|\b(?:temperature|patience|task)\b",
                  lambda m: f"--{m.group(0).replace('_', '-')}" if m.group(0) in names else m.group(0), message)


def _check_output_dir(output_dir: Path) -> None:
    """Fail before any work where no transcript could be written: --output-dir names a file, or a folder
    that cannot be made or written to. Leaves nothing behind (a probe folder is made and removed)."""
    import os
    import tempfile

    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file, not a folder" if existing == output_dir else f"cannot be made: {existing} is not a folder"
        _fail(f"--output-dir {output_dir} {what}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".runtime-probe-", dir=existing))
    except OSError as exc:
        _fail(f"--output-dir {output_dir} cannot be written to: {exc.strerror or exc}")


def _transcribe_each(model, audio, options, transcribe_audio, first_mel=None):
    """(path, result or None) per file, as each finishes; a failure is one line on stderr. first_mel:
    the first file's LogMelPrefetch, if one was started."""
    from .audio import AudioError
    from .decoding import DecodingError
    from .engine import ArtifactError
    from .tokenizer import TokenizerError

    for i, path in enumerate(audio):
        try:
            yield path, transcribe_audio(model, first_mel if i == 0 and first_mel is not None else path, **options)
        except (AudioError, DecodingError, TokenizerError, ArtifactError) as exc:
            _file_error(path, exc)
            yield path, None


# transcribe_batch's own arguments besides the DecodingOptions fields
_BATCH_ARGUMENTS = ("temperature", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold",
                    "initial_prompt", "vad_filter", "vad_parameters")


def _transcribe_batched(model, audio, batch_size: int, options: dict):
    """--batch-size: every file's chunks through runtime.transcribe_batch; files that cannot be read are
    reported and left out. Returns ([(path, result)], number of failed files)."""
    from .api import transcribe_batch
    from .audio import AudioError, load_audio
    from .decoding import DecodingError
    from .tokenizer import TokenizerError

    context = click.get_current_context()
    from .options import NOT_BATCHED

    for name, plain in NOT_BATCHED.items():
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
            _file_error(path, exc)
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
@compute_type_option
@click.option("--top", type=int, default=5, show_default=True, help="how many of the most probable languages to print")
@click.option("--json", "as_json", is_flag=True,
              help="print every language's probability as JSON: [{audio, language, probabilities}, ...]")
def detect_language_command(audio, model_dir, device, compute_type, threads, top, as_json) -> None:
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
        model = load_model(model_dir, device=device, threads=threads or None, compute_type=compute_type)
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
            _file_error(path, exc)
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


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _file_error(path: Path, exc: BaseException) -> None:
    """One line on stderr for a file that failed, named once (an AudioError's message starts with it)."""
    message = _one_line(exc)
    click.echo(f"error: {message}" if message.startswith(f"{path}: ") else f"error: {path}: {message}", err=True)


def _fail(message: str) -> None:
    click.echo(f"error: {_one_line(Exception(message))}", err=True)
    sys.exit(1)


# `runtime transcribe-many`: its own module, which imports neither MAX nor ray until it runs
from .transcribe_many import transcribe_many  # noqa: E402

main.add_command(transcribe_many)


# `runtime serve` (runtime/serve.py); FastAPI and uvicorn are imported only when it runs
from .serve import serve_command  # noqa: E402

main.add_command(serve_command)


if __name__ == "__main__":
    main()
