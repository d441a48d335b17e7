"""One options object for every caller of the runtime: the CLI, the Python API and the server.

`TranscribeOptions` has openai-whisper's keyword names and `whisper.transcribe()`'s defaults (greedy,
the temperature fallback schedule, conditioning on previous text). `TranscribeOptions.from_kwargs`
checks everything a transcription would reject, before any work, and raises `OptionsError`: one
line, naming the keyword (`param`), so the CLI can name its flag and the server OpenAI's `param`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

from runtime.decoding import DecodingError, DecodingOptions, verify_options
from runtime.timing import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS
from runtime.vad import VadError, VadOptions

# whisper.transcribe's default schedule: 0.0, then 0.2 hotter after each failed window
DEFAULT_TEMPERATURES: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class OptionsError(DecodingError):
    """An option a transcription cannot take; `param` is its keyword (e.g. "clip_timestamps")."""

    def __init__(self, param: Optional[str], message: str):
        super().__init__(message)
        self.param = param


# DecodingOptions fields a caller may set; "temperature" is the schedule's, "prompt" is set per window
# by the loop but, as in openai-whisper, may be given (it is replaced)
_DECODE_FIELDS = tuple(f.name for f in fields(DecodingOptions) if f.name != "temperature")


def options_at_temperature(decode_options: dict, temperature: float) -> DecodingOptions:
    """The options of one decode at `temperature`, as whisper.transcribe makes them: beam search
    (beam_size, patience) only at temperature 0, best_of only above it."""
    kwargs = {**decode_options}
    if temperature > 0:
        kwargs.pop("beam_size", None)
        kwargs.pop("patience", None)
    else:
        kwargs.pop("best_of", None)
    return DecodingOptions(**kwargs, temperature=temperature)


@dataclass(frozen=True)
class TranscribeOptions:
    """`whisper.transcribe(model, audio, **options)`'s keywords, with its defaults, plus `batch_windows`."""

    verbose: Optional[bool] = None
    temperature: Tuple[float, ...] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    no_speech_threshold: Optional[float] = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: Optional[str] = None
    carry_initial_prompt: bool = False
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    # seconds: "start,end,start,end,..." or a list; an odd last start runs to the end of the audio
    clip_timestamps: Union[str, Tuple[float, ...]] = "0"
    # only acts with word_timestamps (as in openai-whisper)
    hallucination_silence_threshold: Optional[float] = None
    # ours: independent windows decoded as one batch (runtime/longform.py); 1 disables
    batch_windows: int = 8
    # ours (faster-whisper's): transcribe only the speech Silero VAD finds, timestamps mapped back to the
    # audio (runtime/vad.py); vad_parameters has VadOptions' fields (from_kwargs takes a dict)
    vad_filter: bool = False
    vad_parameters: Optional[VadOptions] = None

    # whisper.DecodingOptions' fields, passed through as whisper.transcribe's **decode_options
    task: str = "transcribe"
    language: Optional[str] = None
    sample_len: Optional[int] = None
    best_of: Optional[int] = None
    beam_size: Optional[int] = None
    patience: Optional[float] = None
    length_penalty: Optional[float] = None
    prompt: Optional[Union[str, Tuple[int, ...]]] = None
    prefix: Optional[Union[str, Tuple[int, ...]]] = None
    suppress_tokens: Optional[Union[str, Tuple[int, ...]]] = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: Optional[float] = 1.0
    fp16: bool = True  # accepted, as openai-whisper's; the artifacts decide precision

    @classmethod
    def names(cls) -> frozenset:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "TranscribeOptions":
        """The options `whisper.transcribe(**kwargs)` would run with, checked; OptionsError otherwise."""
        unknown = sorted(set(kwargs) - cls.names())
        if unknown:
            raise OptionsError(unknown[0], f"unknown decoding option(s): {', '.join(unknown)}")
        if "temperature" in kwargs:
            kwargs["temperature"] = temperature_tuple(kwargs["temperature"])
        for name in ("clip_timestamps", "prompt", "prefix", "suppress_tokens"):
            value = kwargs.get(name)
            if value is not None and not isinstance(value, str):
                try:
                    kwargs[name] = tuple(value)
                except TypeError:
                    raise OptionsError(name, f"{name} must be a string or a list, got {value!r}") from None
        if kwargs.get("vad_parameters") is not None:
            try:
                kwargs["vad_parameters"] = VadOptions.from_parameters(kwargs["vad_parameters"])
            except VadError as exc:
                raise OptionsError("vad_parameters", str(exc)) from None
        options = cls(**kwargs)
        options.validate()
        return options

    def validate(self) -> "TranscribeOptions":
        for t in self.temperature:
            # every temperature of the schedule must make a decode openai-whisper would accept
            try:
                verify_options(self.decoding_options(t))
            except OptionsError:
                raise
            except DecodingError as exc:
                raise OptionsError(_param_of(str(exc)), str(exc)) from None
        if isinstance(self.batch_windows, bool) or not isinstance(self.batch_windows, int) or self.batch_windows < 1:
            raise OptionsError("batch_windows", f"batch_windows must be a positive integer, got {self.batch_windows!r}")
        parse_clip_timestamps(self.clip_timestamps)
        if self.vad_filter and self.clips() != [(0.0, None)]:
            # faster-whisper silently drops the VAD then; both choose what to transcribe, so say so
            raise OptionsError("vad_filter", "vad_filter and clip_timestamps both choose which audio to "
                                             "transcribe: pass one of them")
        if self.vad_parameters is not None:
            try:
                self.vad_parameters.check()
            except VadError as exc:
                raise OptionsError("vad_parameters", str(exc)) from None
        return self

    # -- what the decoding loop needs ---------------------------------------------------------
    @property
    def temperatures(self) -> Tuple[float, ...]:
        return self.temperature

    def decode_options(self) -> dict:
        """The DecodingOptions fields (less temperature) as whisper.transcribe's decode_options dict."""
        values = {name: getattr(self, name) for name in _DECODE_FIELDS}
        for name in ("prompt", "prefix", "suppress_tokens"):
            if isinstance(values[name], tuple):
                values[name] = list(values[name])
        return values

    def decoding_options(self, temperature: float) -> DecodingOptions:
        """One decode's options at `temperature` (options_at_temperature)."""
        return options_at_temperature(self.decode_options(), temperature)

    def clips(self) -> List[Tuple[float, Optional[float]]]:
        """The clips as (start, end or None for the end of the audio), in seconds."""
        return parse_clip_timestamps(self.clip_timestamps)

    def as_kwargs(self) -> dict:
        """Keyword arguments that make the same options again (runtime.transcribe(**as_kwargs()))."""
        return asdict(self)

    def replace(self, **changes) -> "TranscribeOptions":
        return type(self).from_kwargs(**{**self.as_kwargs(), **changes})


def _param_of(message: str) -> Optional[str]:
    """The keyword a DecodingError message is about: the first option name it mentions."""
    words = message.replace(",", " ").replace("(", " ").replace(")", " ").split()
    return next((w for w in words if w in TranscribeOptions.names()), None)


def temperature_tuple(temperature) -> Tuple[float, ...]:
    """A number or a sequence of numbers as whisper.transcribe takes them, as a tuple. The numbers
    are kept as given: an int 0 stays 0, as openai-whisper writes it into each segment's JSON."""
    values = [temperature] if isinstance(temperature, numbers.Real) else temperature
    try:
        values = tuple(values)
    except TypeError:
        values = (temperature,)
    for t in values:
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise OptionsError("temperature", f"temperature must be a number or a sequence of numbers, "
                                              f"got {temperature!r}")
        if not math.isfinite(t) or t < 0:
            raise OptionsError("temperature", f"temperature must be a finite number >= 0, got {t!r}")
    if not values:
        raise OptionsError("temperature", "temperature must be a number or a non-empty sequence of numbers")
    return values


def temperature_schedule(start: float, increment: Optional[float]) -> Tuple[float, ...]:
    """The temperatures openai-whisper's CLI tries: `start`, then `increment` hotter up to 1.0 after
    each failed window (np.arange, as its CLI: the same floats, 0.6000000000000001 included, end up
    in each segment's "temperature"); `increment` None or 0 disables fallback."""
    start = temperature_tuple(start)[0]
    if increment is None or increment == 0:
        return (start,)
    if not math.isfinite(increment) or increment < 0:
        raise OptionsError("temperature_increment_on_fallback",
                           f"temperature_increment_on_fallback must be a finite number >= 0, got {increment!r}")
    import numpy as np

    return tuple(float(t) for t in np.arange(start, 1.0 + 1e-6, increment)) or (start,)


def parse_clip_timestamps(clip_timestamps: Union[str, Sequence[float]]) -> List[Tuple[float, Optional[float]]]:
    """(start, end) seconds per clip, end None for "to the end of the audio".

    Refuses what openai-whisper would crash on (a non-number) or silently misread: a negative or
    non-finite time (it would slice the spectrogram from its end) and a clip that ends before it
    starts (it would transcribe nothing).
    """
    if isinstance(clip_timestamps, str):
        texts = [t for t in clip_timestamps.split(",")] if clip_timestamps else []
    else:
        texts = list(clip_timestamps)
    seconds: List[float] = []
    for text in texts:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise OptionsError("clip_timestamps", f"clip_timestamps takes comma-separated seconds "
                                                  f"(start,end,start,end,...), got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise OptionsError("clip_timestamps", f"clip_timestamps must be seconds from the start of the audio "
                                                  f"(>= 0), got {text!r}")
        seconds.append(value)
    if not seconds:
        seconds = [0.0]
    clips: List[Tuple[float, Optional[float]]] = []
    for i in range(0, len(seconds), 2):
        start = seconds[i]
        end = seconds[i + 1] if i + 1 < len(seconds) else None
        if end is not None and end <= start:
            raise OptionsError("clip_timestamps", f"clip_timestamps: clip {i // 2 + 1} ends at {end:g} s, "
                                                  f"not after its start at {start:g} s")
        clips.append((start, end))
    return clips


# --- checks of which options go together, shared by the CLI and the server ----------------------

# transcribe's options that the many-files mode (runtime.transcribe_batch) does not have: its chunks
# are fixed and independent
NOT_BATCHED = {"word_timestamps": False, "clip_timestamps": "0", "carry_initial_prompt": False,
               "hallucination_silence_threshold": None}

# the writers' subtitle options, which need word timings
SUBTITLE_OPTIONS = ("highlight_words", "max_line_count", "max_line_width", "max_words_per_line")


def check_subtitle_options(word_timestamps: bool, hallucination_silence_threshold: Optional[float],
                           subtitle_options: dict) -> List[str]:
    """OptionsError for what openai-whisper's CLI refuses (subtitle options without word timestamps);
    returns the warnings it prints for combinations that only have no effect."""
    warnings: List[str] = []
    if not word_timestamps:
        for name in SUBTITLE_OPTIONS:
            if subtitle_options.get(name):
                raise OptionsError(name, f"{name} requires word_timestamps")
        if hallucination_silence_threshold is not None:
            warnings.append("hallucination_silence_threshold has no effect without word_timestamps")
    if subtitle_options.get("max_line_count") and not subtitle_options.get("max_line_width"):
        warnings.append("max_line_count has no effect without max_line_width")
    if subtitle_options.get("max_words_per_line") and subtitle_options.get("max_line_width"):
        warnings.append("max_words_per_line has no effect with max_line_width")
    return warnings
