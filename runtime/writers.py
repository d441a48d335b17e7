"""Transcript output files with the same bytes as openai-whisper's writers (whisper/utils.py).

Formats: txt, vtt, srt, tsv, json, or all five. The one intended difference from openai-whisper is
that each file is written atomically: the text goes to a temporary file in the output directory,
which then replaces the target, so a reader never sees a half-written transcript.

Subtitle options (max_line_width, max_line_count, highlight_words, max_words_per_line) act only on
segments that carry word timings ("words"); without them, as in openai-whisper, each segment is one
cue and the options are ignored.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from typing import Callable, Iterator, List, Optional, Tuple

OUTPUT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """`[HH:]MM:SS<marker>mmm`, rounded to the millisecond; hours shown when asked for or non-zero."""
    if not seconds >= 0:
        raise ValueError(f"non-negative timestamp expected, got {seconds!r}")
    total_ms = round(seconds * 1000.0)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1_000)
    hours_part = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_part}{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def _segments(result: dict) -> list:
    if not isinstance(result, dict) or "segments" not in result:
        raise ValueError("transcription result must be a dict with a 'segments' list")
    return result["segments"]


# --- subtitles ---------------------------------------------------------------------------------


def _first_word_start(segments: list) -> Optional[float]:
    for segment in segments:
        for word in segment["words"]:
            return word["start"]
    return segments[0]["start"] if segments else None


def _group_words(
    segments: list,
    max_line_width: int,
    max_line_count: Optional[int],
    max_words_per_line: int,
    preserve_segments: bool,
) -> Iterator[List[dict]]:
    """Cut the word timings into subtitles (lists of word dicts, line breaks as a leading "\\n")."""
    line_len = 0
    line_count = 1
    subtitle: List[dict] = []
    last_start = _first_word_start(segments) or 0.0
    for segment in segments:
        words = segment["words"]
        # words go in chunks of max_words_per_line; each chunk starts like a new segment
        for chunk_start in range(0, len(words), max_words_per_line):
            chunk = words[chunk_start : chunk_start + max_words_per_line]
            for position, original in enumerate(chunk):
                timing = dict(original)
                text = timing["word"]
                long_pause = not preserve_segments and timing["start"] - last_start > 3.0
                fits = line_len + len(text) <= max_line_width
                segment_break = position == 0 and bool(subtitle) and preserve_segments
                if line_len > 0 and fits and not long_pause and not segment_break:
                    line_len += len(text)  # same line
                else:
                    text = text.strip()
                    new_subtitle = segment_break or (
                        bool(subtitle) and max_line_count is not None and (long_pause or line_count >= max_line_count)
                    )
                    if new_subtitle:
                        yield subtitle
                        subtitle = []
                        line_count = 1
                    elif line_len > 0:
                        line_count += 1
                        text = "\n" + text
                    timing["word"] = text
                    line_len = len(text.strip())
                subtitle.append(timing)
                last_start = timing["start"]
    if subtitle:
        yield subtitle


_UNDERLINE = re.compile(r"^(\s*)(.*)$")


def _subtitle_cues(
    result: dict,
    options: Optional[dict],
    timestamp: Callable[[float], str],
    *,
    max_line_width: Optional[int] = None,
    max_line_count: Optional[int] = None,
    highlight_words: bool = False,
    max_words_per_line: Optional[int] = None,
) -> Iterator[Tuple[str, str, str]]:
    """(start, end, text) for each cue, as openai-whisper's SubtitlesWriter.iterate_result."""
    segments = _segments(result)
    options = options or {}
    max_line_width = max_line_width or options.get("max_line_width")
    max_line_count = max_line_count or options.get("max_line_count")
    highlight_words = highlight_words or options.get("highlight_words", False)
    max_words_per_line = max_words_per_line or options.get("max_words_per_line")
    preserve_segments = max_line_count is None or max_line_width is None

    if not (len(segments) > 0 and "words" in segments[0]):
        for segment in segments:
            text = segment["text"].strip().replace("-->", "->")
            yield timestamp(segment["start"]), timestamp(segment["end"]), text
        return

    groups = _group_words(segments, max_line_width or 1000, max_line_count, max_words_per_line or 1000,
                          preserve_segments)
    for subtitle in groups:
        start = timestamp(subtitle[0]["start"])
        end = timestamp(subtitle[-1]["end"])
        words = [timing["word"] for timing in subtitle]
        text = "".join(words)
        if not highlight_words:
            yield start, end, text
            continue
        previous_end = start
        for index, timing in enumerate(subtitle):
            word_start = timestamp(timing["start"])
            word_end = timestamp(timing["end"])
            if previous_end != word_start:
                yield previous_end, word_start, text  # the gap before this word, nothing underlined
            underlined = [_UNDERLINE.sub(r"\1<u>\2</u>", word) if j == index else word for j, word in enumerate(words)]
            yield word_start, word_end, "".join(underlined)
            previous_end = word_end


# --- formats -----------------------------------------------------------------------------------


def render_txt(result: dict, options: Optional[dict] = None, **kwargs) -> str:
    return "".join(segment["text"].strip() + "\n" for segment in _segments(result))


def render_vtt(result: dict, options: Optional[dict] = None, **kwargs) -> str:
    def timestamp(seconds: float) -> str:
        return format_timestamp(seconds, always_include_hours=False, decimal_marker=".")

    parts = ["WEBVTT\n\n"]
    for start, end, text in _subtitle_cues(result, options, timestamp, **kwargs):
        parts.append(f"{start} --> {end}\n{text}\n\n")
    return "".join(parts)


def render_srt(result: dict, options: Optional[dict] = None, **kwargs) -> str:
    def timestamp(seconds: float) -> str:
        return format_timestamp(seconds, always_include_hours=True, decimal_marker=",")

    parts = []
    for number, (start, end, text) in enumerate(_subtitle_cues(result, options, timestamp, **kwargs), start=1):
        parts.append(f"{number}\n{start} --> {end}\n{text}\n\n")
    return "".join(parts)


def render_tsv(result: dict, options: Optional[dict] = None, **kwargs) -> str:
    """start and end in integer milliseconds, tabs in the text turned into spaces."""
    parts = ["start\tend\ttext\n"]
    for segment in _segments(result):
        text = segment["text"].strip().replace("\t", " ")
        parts.append(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}\n")
    return "".join(parts)


def render_json(result: dict, options: Optional[dict] = None, **kwargs) -> str:
    return json.dumps(result)


_RENDERERS = {
    "txt": render_txt,
    "vtt": render_vtt,
    "srt": render_srt,
    "tsv": render_tsv,
    "json": render_json,
}


def _write_atomically(path: str, text: str) -> None:
    """Write `text` (UTF-8, platform newlines as open(..., "w") gives) to `path` via a temp file."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # mode 0o666 minus the umask, the same permissions a plain open() would give
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


class _Writer:
    def __init__(self, output_format: str, output_dir: str):
        self.output_format = output_format
        self.output_dir = output_dir

    def output_path(self, audio_path: str) -> str:
        stem = os.path.splitext(os.path.basename(audio_path))[0]
        return os.path.join(self.output_dir, f"{stem}.{self.output_format}")

    def __call__(self, result: dict, audio_path: str, options: Optional[dict] = None, **kwargs) -> None:
        text = _RENDERERS[self.output_format](result, options, **kwargs)
        _write_atomically(self.output_path(os.fspath(audio_path)), text)


def get_writer(output_format: str, output_dir: str) -> Callable[..., None]:
    """A writer for `output_format` (txt, vtt, srt, tsv, json or all), called as
    writer(result, audio_path, options) to write `<output_dir>/<audio stem>.<format>`."""
    if output_format == "all":
        writers = [_Writer(name, output_dir) for name in OUTPUT_FORMATS]

        def write_all(result: dict, audio_path: str, options: Optional[dict] = None, **kwargs) -> None:
            for writer in writers:
                writer(result, audio_path, options, **kwargs)

        return write_all
    if output_format not in _RENDERERS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {', '.join(OUTPUT_FORMATS)}, all")
    return _Writer(output_format, output_dir)
