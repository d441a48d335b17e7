"""Voice activity detection (runtime/vad.py): Silero VAD's speech chunks equal faster-whisper's, the
timestamp map, and transcription with vad_filter through the runtime (sequential and batched)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from audio_samples import synthesize_speech
from conftest import run_tool

fw_vad = pytest.importorskip("faster_whisper.vad", reason="faster-whisper (dev extra) is the reference")

from runtime import vad  # noqa: E402
from runtime.audio import SAMPLE_RATE, load_audio  # noqa: E402

SR = SAMPLE_RATE
# quick decodes: the random-weight model never stops on its own before the token limit
DECODE = dict(language="en", temperature=0.0, sample_len=16)

PARAMETERS = [
    {},
    dict(min_silence_duration_ms=160, max_speech_duration_s=30),  # faster-whisper's batched defaults
    dict(threshold=0.3, neg_threshold=0.1, speech_pad_ms=100, min_silence_duration_ms=300),
    dict(max_speech_duration_s=2.0, min_silence_duration_ms=100, min_speech_duration_ms=250),
    dict(threshold=0.8, speech_pad_ms=0, min_silence_duration_ms=0),
]


@pytest.fixture(scope="module")
def spoken(work_dir) -> np.ndarray:
    return load_audio(str(synthesize_speech(work_dir / "vad-speech.wav", n_sentences=2)))


@pytest.fixture(scope="module")
def layout(spoken):
    """Speech with long silences, a tone and noise between, and where the speech is (seconds)."""
    rng = np.random.default_rng(0)
    silence = lambda seconds: np.zeros(int(seconds * SR), dtype=np.float32)  # noqa: E731
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
    noise = (0.05 * rng.standard_normal(SR)).astype(np.float32)
    parts = [silence(3), spoken[:5 * SR], silence(4), tone, noise, silence(2), spoken[5 * SR:], silence(0.0771)]
    audio = np.concatenate(parts)
    first = (3.0, 8.0)
    second_start = 8.0 + 4 + 1 + 1 + 2
    return audio, [first, (second_start, second_start + len(spoken) / SR - 5)]


@pytest.fixture(scope="module")
def audio(layout) -> np.ndarray:
    return layout[0]


# --- speech chunks -----------------------------------------------------------------------------------


def test_probabilities_equal_faster_whispers(audio):
    """Same model, same windows, same float32 results; also across the 10000-window runs (> 320 s)."""
    long = np.tile(audio, 16)
    assert len(long) // vad.WINDOW_SAMPLES > vad.WINDOWS_PER_RUN
    reference = fw_vad.get_vad_model()
    for samples in (audio, long, audio[:512 * 40]):  # the last: a whole number of windows
        ours = vad.load_vad_model()(samples)
        theirs = reference(np.pad(samples, (0, 512 - len(samples) % 512)))
        assert ours.dtype == theirs.dtype == np.float32
        assert np.array_equal(ours, theirs)


def _blocks(samples: np.ndarray, sizes):
    """The samples cut into blocks of the given sizes in turn (the last takes what is left)."""
    at, i = 0, 0
    while at < len(samples):
        size = sizes[i % len(sizes)]
        yield samples[at: at + size]
        at, i = at + size, i + 1


@pytest.mark.parametrize("sizes", [[16000 * 30], [512], [1000, 7, 65536, 512 * 10000], [512 * 10000 + 64]],
                         ids=["30s", "512", "odd", "a run and a context"])
def test_streamed_probabilities_equal_the_whole_audios(audio, sizes):
    """Scored a block at a time (the server's uploads with vad_filter), across the 10000-window runs,
    ending on and off whole windows: the same float32 probabilities as the whole audio at once."""
    model = vad.load_vad_model()
    long = np.tile(audio, 16)
    for samples in (long, long[:512 * 10000], long[:512 * 10000 + 1], audio[:512 * 40], audio[:100]):
        whole = model(samples)
        streamed, n_samples = model.streamed(_blocks(samples, sizes))
        assert n_samples == len(samples)
        assert streamed.dtype == np.float32 and np.array_equal(streamed, whole), len(samples)


@pytest.mark.parametrize("sizes", [[16000 * 30], [333], [1000, 4000, 1]], ids=["30s", "333", "odd"])
def test_speech_blocks_join_into_collect_chunks_piece(audio, sizes):
    for parameters in PARAMETERS:
        chunks = vad.speech_timestamps(audio, vad.VadOptions.from_parameters(parameters))
        streamed, n_samples = vad.streamed_speech_timestamps(_blocks(audio, sizes),
                                                             vad.VadOptions.from_parameters(parameters))
        assert streamed == chunks and n_samples == len(audio)
        (piece,) = vad.collect_chunks(audio, chunks)
        joined = list(vad.speech_blocks(_blocks(audio, sizes), chunks))
        assert all(len(block) for block in joined)
        assert np.array_equal(np.concatenate(joined) if joined else np.zeros(0, np.float32), piece.samples)


@pytest.mark.parametrize("parameters", PARAMETERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "defaults")
def test_speech_timestamps_equal_faster_whispers(audio, parameters):
    ours = vad.speech_timestamps(audio, vad.VadOptions.from_parameters(parameters))
    theirs = fw_vad.get_speech_timestamps(audio, fw_vad.VadOptions(**parameters))
    assert ours, "no speech found"
    assert ours == theirs
    assert all(type(c["start"]) is int and type(c["end"]) is int for c in ours)


def test_speech_timestamps_equal_faster_whispers_on_long_audio(audio):
    long = np.concatenate([audio] * 16)
    parameters = dict(max_speech_duration_s=3.0, min_silence_duration_ms=50)
    ours = vad.speech_timestamps(long, vad.VadOptions.from_parameters(parameters))
    assert len(ours) > 32
    assert ours == fw_vad.get_speech_timestamps(long, fw_vad.VadOptions(**parameters))


def test_chunk_rules_equal_faster_whispers_on_random_probabilities(monkeypatch):
    """The rules alone (thresholds, silences, the cut of long speech, padding) on scripted probabilities."""
    rng = np.random.default_rng(1)
    compared = 0
    for trial in range(1500):
        n = int(rng.integers(1, 300))
        if trial % 2:
            probabilities = rng.random(n).astype(np.float32)
        else:  # runs of speech and silence, as real audio has
            probabilities = np.repeat(rng.random(n // 8 + 1), 8)[:n].astype(np.float32)
        n_samples = 512 * n - int(rng.integers(1, 513))
        parameters = dict(threshold=float(rng.choice([0.5, 0.3, 0.7])),
                          min_speech_duration_ms=int(rng.choice([0, 50, 250])),
                          max_speech_duration_s=float(rng.choice([np.inf, 0.9, 1.5, 3.0])),
                          min_silence_duration_ms=int(rng.choice([0, 100, 160, 2000])),
                          speech_pad_ms=int(rng.choice([0, 30, 200, 400])))
        if rng.random() < 0.3:
            parameters["neg_threshold"] = float(rng.choice([0.1, 0.25]))
        try:
            options = vad.VadOptions.from_parameters(parameters)
        except vad.VadError:  # e.g. max_speech_duration_s too short for the padding
            continue
        monkeypatch.setattr(fw_vad, "get_vad_model", lambda: (lambda padded: probabilities))
        theirs = fw_vad.get_speech_timestamps(np.zeros(n_samples, np.float32), fw_vad.VadOptions(**parameters))
        assert vad.speech_from_probabilities(probabilities, n_samples, options) == theirs, parameters
        compared += 1
    assert compared > 1000


def test_speech_is_found_where_it_is(layout):
    """The speech chunks cover the spoken parts and leave out the long silences, the tone and the noise."""
    audio, spoken_parts = layout
    chunks = vad.speech_timestamps(audio)
    assert len(chunks) == 2
    for chunk, (start, end) in zip(chunks, spoken_parts):
        # within 0.4 s padding (plus a window) of the speech, and most of the speech inside
        assert start - 0.45 <= chunk["start"] / SR and chunk["end"] / SR <= end + 0.45
        assert chunk["end"] / SR - chunk["start"] / SR > 0.8 * (end - start)


# --- chunk collection and the timestamp map ----------------------------------------------------------


@pytest.mark.parametrize("max_duration", [float("inf"), 30.0, 3.0])
def test_collect_chunks_equals_faster_whispers(audio, max_duration):
    chunks = vad.speech_timestamps(audio, vad.VadOptions(min_silence_duration_ms=160, max_speech_duration_s=30))
    assert len(chunks) > 2
    ours = vad.collect_chunks(audio, chunks, max_duration=max_duration)
    audios, metadata = fw_vad.collect_chunks(audio, chunks, max_duration=max_duration)
    # faster-whisper starts with an empty piece when the first chunk alone exceeds max_duration; not here
    theirs = [(a, m) for a, m in zip(audios, metadata) if len(a)]
    assert len(ours) == len(theirs)
    for piece, (samples, meta) in zip(ours, theirs):
        assert np.array_equal(piece.samples, samples)
        assert (piece.offset, piece.duration) == (meta["offset"], meta["duration"])
    assert [c for piece in ours for c in piece.chunks] == chunks
    if max_duration == 3.0:
        assert len(ours) > 1 and all(p.duration <= 3.0 or len(p.chunks) == 1 for p in ours)


def test_no_speech_collects_one_empty_piece(audio):
    (piece,) = vad.collect_chunks(audio, [])
    assert len(piece.samples) == 0 and piece.offset == 0 and piece.duration == 0


def test_timestamp_map():
    # speech 1..3 s and 5..6 s of the audio: 2 s, then 1 s of joined speech
    timeline = vad.SpeechTimestampsMap([{"start": SR, "end": 3 * SR}, {"start": 5 * SR, "end": 6 * SR}], SR)
    assert timeline.get_original_time(0.0) == 1.0
    assert timeline.get_original_time(1.5) == 2.5
    assert timeline.get_original_time(2.0) == 5.0  # the second chunk's start...
    assert timeline.get_original_time(2.0, is_end=True) == 3.0  # ...or, as an end, the first one's end
    assert timeline.get_original_time(2.5) == 5.5
    assert timeline.get_original_time(3.4) == 6.4  # past the last chunk: its offset still applies
    assert timeline.get_original_time(1.2345) == 2.23  # rounded to 10 ms, as faster-whisper


def test_timestamp_map_equals_faster_whispers(audio):
    chunks = vad.speech_timestamps(audio, vad.VadOptions(min_silence_duration_ms=160, max_speech_duration_s=30))
    ours, theirs = vad.SpeechTimestampsMap(chunks, SR), fw_vad.SpeechTimestampsMap(chunks, SR)
    joined = sum(c["end"] - c["start"] for c in chunks) / SR
    boundaries = list(np.cumsum([c["end"] - c["start"] for c in chunks]) / SR)
    for time in [*np.arange(0, joined + 1, 0.01), *boundaries]:
        for is_end in (False, True):
            assert ours.get_original_time(float(time), is_end=is_end) == \
                theirs.get_original_time(float(time), is_end=is_end), (time, is_end)


def test_restore_segments_equals_faster_whispers():
    from faster_whisper.transcribe import Segment, Word, restore_speech_timestamps

    chunks = [{"start": 8000, "end": 40000}, {"start": 64000, "end": 80000}, {"start": 120000, "end": 136000}]
    words = [[(0.1, 0.5), (0.6, 1.9), (1.95, 2.1)], [], [(2.2, 2.6), (2.9, 3.1)], None]
    times = [(0.0, 2.1), (2.0, 2.0), (2.2, 3.1), (1.0, 3.0)]
    ours, theirs = [], []
    for i, ((start, end), word_times) in enumerate(zip(times, words)):
        our_words = None if word_times is None else [dict(word=f" w{j}", start=s, end=e, probability=0.5)
                                                     for j, (s, e) in enumerate(word_times)]
        ours.append(dict(id=i, seek=0, start=start, end=end, text="", tokens=[], words=our_words))
        theirs.append(Segment(id=i, seek=0, start=start, end=end, text="", tokens=[], avg_logprob=0.0,
                              compression_ratio=1.0, no_speech_prob=0.0, temperature=0.0,
                              words=None if our_words is None else [Word(**w) for w in our_words]))
    restored = vad.restore_segments(ours, vad.SpeechTimestampsMap(chunks))
    expected = list(restore_speech_timestamps(theirs, chunks, SR))
    for segment, reference in zip(restored, expected, strict=True):
        assert (segment["start"], segment["end"]) == (reference.start, reference.end)
        assert [(w["start"], w["end"]) for w in segment["words"] or []] == \
            [(w.start, w.end) for w in reference.words or []]
    assert ours[0]["start"] == 0.0, "the given segments are left alone"


# --- transcription -------------------------------------------------------------------------------------


def _inside_speech(time: float, chunks: list[dict]) -> bool:
    return any(c["start"] / SR - 0.01 <= time <= c["end"] / SR + 0.01 for c in chunks)


def test_transcribe_with_vad_filter_is_the_speech_transcribed(tiny_runtime, audio):
    """vad_filter=True decodes the joined speech (the same tokens as transcribing it directly) and puts
    every time on the original audio's timeline, inside the speech."""
    import runtime

    parameters = dict(min_silence_duration_ms=500, speech_pad_ms=200)
    filtered = runtime.transcribe(tiny_runtime, audio, vad_filter=True, vad_parameters=parameters,
                                  word_timestamps=True, **DECODE)
    speech, chunks = vad.speech_only(audio, parameters)
    assert len(chunks) >= 2 and len(speech) < 0.75 * len(audio)
    direct = runtime.transcribe(tiny_runtime, speech, word_timestamps=True, **DECODE)

    assert filtered["segments"], "no segments"
    assert [s["tokens"] for s in filtered["segments"]] == [s["tokens"] for s in direct["segments"]]
    assert filtered["text"] == direct["text"]
    assert filtered["segments"] == vad.restore_segments(direct["segments"], vad.SpeechTimestampsMap(chunks))
    timed = [s for s in filtered["segments"] if s["words"]]
    assert timed, "no segment with words"
    # a word is placed by the chunk its middle falls in (its ends may reach past that chunk, as in
    # faster-whisper): its middle lies in the speech
    for word in (w for s in timed for w in s["words"]):
        assert _inside_speech((word["start"] + word["end"]) / 2, chunks), (word, chunks)
    # the times moved: some segment lies past the first silence that was cut out
    assert max(s["end"] for s in timed) > chunks[1]["start"] / SR


def test_vad_filter_on_a_file_streams_it_and_transcribes_the_same(tiny_runtime, audio, audio_file, monkeypatch):
    """A file, bytes or a seekable file object with vad_filter is read twice as it decodes (the VAD,
    then the speech into the log-mel), never loaded whole; a stream that cannot seek back is loaded.
    Every route gives the transcription of the same samples in memory."""
    import io

    import runtime
    import runtime.longform as longform

    samples = load_audio(str(audio_file))
    expected = runtime.transcribe(tiny_runtime, samples, vad_filter=True, **DECODE)
    assert expected["segments"]
    loads = []
    monkeypatch.setattr(longform, "load_audio", lambda *a, **k: loads.append(a) or load_audio(*a, **k))

    class Unseekable(io.RawIOBase):
        def __init__(self, data):
            self._data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self._data.readinto(buffer)

    data = audio_file.read_bytes()
    for source in (str(audio_file), data, io.BytesIO(data)):
        assert runtime.transcribe(tiny_runtime, source, vad_filter=True, **DECODE) == expected
    assert loads == []
    assert runtime.transcribe(tiny_runtime, Unseekable(data), vad_filter=True, **DECODE) == expected
    assert len(loads) == 1


def test_transcribe_without_speech(tiny_runtime, layout):
    import runtime

    audio, spoken_parts = layout
    no_speech = audio[int((spoken_parts[0][1] + 1) * SR):int((spoken_parts[1][0] - 0.5) * SR)]  # tone, noise
    assert vad.speech_timestamps(no_speech) == []
    result = runtime.transcribe(tiny_runtime, no_speech, vad_filter=True, **DECODE)
    assert result == {"text": "", "segments": [], "language": "en"}
    (batched,) = runtime.transcribe_batch(tiny_runtime, [no_speech], vad_filter=True,
                                          condition_on_previous_text=False, **DECODE)
    assert batched == {"text": "", "segments": [], "language": "en"}


def test_batched_vad_decodes_the_speech_pieces(tiny_runtime, audio, speech_72s):
    """transcribe_batch(vad_filter=True) batches the pieces of joined speech (at most 30 s each), not the
    30 s grid: each input's segments are those of its pieces transcribed alone, mapped back."""
    import runtime
    from runtime.batched import BATCHED_VAD_DEFAULTS

    inputs = [audio, load_audio(str(speech_72s))]
    options = dict(condition_on_previous_text=False, **DECODE)
    results = runtime.transcribe_batch(tiny_runtime, inputs, batch_size=4, vad_filter=True, **options)
    n_pieces = 0
    for samples, result in zip(inputs, results):
        chunks = vad.speech_timestamps(samples, vad.VadOptions(**BATCHED_VAD_DEFAULTS))
        pieces = vad.collect_chunks(samples, chunks, max_duration=30.0)
        n_pieces += len(pieces)
        assert all(p.duration <= 30.0 for p in pieces)
        alone = runtime.transcribe_batch(tiny_runtime, [p.samples for p in pieces], vad_filter=False, **options)
        expected = []
        for piece, piece_result in zip(pieces, alone):
            for segment in piece_result["segments"]:
                expected.append(dict(segment, seek=int(piece.offset * 100), start=segment["start"] + piece.offset,
                                     end=segment["end"] + piece.offset))
        expected = vad.restore_segments(expected, vad.SpeechTimestampsMap(chunks))
        assert result["segments"], "no segments"
        assert [s["tokens"] for s in result["segments"]] == [s["tokens"] for s in expected]
        assert [s["seek"] for s in result["segments"]] == [s["seek"] for s in expected]
        # a piece's last segment may end at the piece's length: exact samples here, whole frames alone
        for segment, reference in zip(result["segments"], expected):
            assert segment["start"] == pytest.approx(reference["start"], abs=0.011)
            assert segment["end"] == pytest.approx(reference["end"], abs=0.011)
        first_of_piece = {s["seek"]: s for s in reversed(result["segments"])}
        assert all(_inside_speech(s["start"], chunks) for s in first_of_piece.values())
    assert n_pieces >= 4  # 72 s of speech is more than two windows


# --- real speech with long silences: against faster-whisper's transcription ---------------------------

# (sentences of audio_samples.SENTENCES, espeak-ng voice, seconds of silence before the passage)
PASSAGES = [((0,), "en-us", 2.0), ((1, 2), "en-gb", 6.0), ((3,), "en-us", 9.0), ((4, 5), "en-us", 5.0),
            ((6,), "en-gb", 10.0), ((7, 8), "en-us", 7.0)]
TAIL_SILENCE_S = 4.0
REAL_VAD = dict(min_silence_duration_ms=1000, speech_pad_ms=300)  # the same parameters on both sides
TIMING_SLACK_S = 0.2  # beyond a passage's padding a segment time may reach (whisper's 20 ms steps, rounding)


@pytest.fixture(scope="module")
def long_silences(work_dir):
    """Spoken passages with 5 to 10 s of silence between them: (samples, the words spoken, each passage's
    (start, end) in seconds)."""
    from audio_samples import SENTENCES, speak

    pieces, texts, regions, at = [], [], [], 0
    for i, (sentences, voice, silence) in enumerate(PASSAGES):
        pieces.append(np.zeros(int(silence * SR), dtype=np.float32))
        at += len(pieces[-1])
        text = " ".join(SENTENCES[j] for j in sentences)
        spoken = load_audio(str(speak(text, work_dir / f"vad-passage-{i}.wav", voice=voice)))
        pieces.append(spoken)
        regions.append((at / SR, (at + len(spoken)) / SR))
        at += len(spoken)
        texts.append(text)
    pieces.append(np.zeros(int(TAIL_SILENCE_S * SR), dtype=np.float32))
    return np.concatenate(pieces), " ".join(texts), regions


@pytest.fixture(scope="module")
def faster_tiny_en(real_tiny_en_dir):
    """faster-whisper on the CTranslate2 folder real_tiny_en_dir was converted from, float32."""
    from pathlib import Path

    from faster_whisper import WhisperModel

    from converter.registry import fetch

    return WhisperModel(str(fetch("tiny.en", Path.home() / ".cache" / "whisper")), device="cpu", compute_type="float32")


@pytest.mark.parametrize("beam_size", [None, 5], ids=["greedy", "beam5"])
def test_transcripts_with_long_silences_agree_with_faster_whispers(real_tiny_en_runtime, faster_tiny_en, long_silences,
                                                                   monkeypatch, beam_size):
    """openai's tiny.en with vad_filter=True here and in faster-whisper (its CTranslate2 folder, float32), the
    same VAD parameters and decoding options (greedy, or faster-whisper's default beam 5; temperature 0 without
    fallback, conditioning on previous text, timestamps): the same speech chunks, both transcripts close to the
    words spoken and to each other, and every segment of both inside (or within the padding of) the passages,
    covering the same passages. Their log-Mel front ends and kernels differ, so equal tokens are not asserted."""
    import faster_whisper.transcribe as fw_transcribe

    import runtime
    import runtime.longform
    from bench.wer import word_error_rate

    audio, spoken, regions = long_silences
    used = {}

    def recorded(name, function):
        def call(*args, **kwargs):
            used[name] = function(*args, **kwargs)
            return used[name]
        return call

    # the speech chunks each transcription actually used
    monkeypatch.setattr(runtime.longform, "speech_only", recorded("ours", runtime.longform.speech_only))
    monkeypatch.setattr(fw_transcribe, "get_speech_timestamps", recorded("theirs", fw_transcribe.get_speech_timestamps))

    ours = runtime.transcribe(real_tiny_en_runtime, audio, language="en", temperature=0.0, beam_size=beam_size,
                              condition_on_previous_text=True, vad_filter=True, vad_parameters=dict(REAL_VAD),
                              verbose=None)
    segments, info = faster_tiny_en.transcribe(audio, language="en", beam_size=beam_size or 1, best_of=1,
                                               temperature=0.0, condition_on_previous_text=True, vad_filter=True,
                                               vad_parameters=dict(REAL_VAD))
    theirs = list(segments)

    # the same speech chunks (sample offsets), one or more in each passage's padded extent and none elsewhere
    speech, chunks = used["ours"]
    assert chunks == used["theirs"] == vad.speech_timestamps(audio, vad.VadOptions(**REAL_VAD))
    assert info.duration_after_vad == len(speech) / SR
    pad = REAL_VAD["speech_pad_ms"] / 1000

    def passage_of(time: float):
        return next((i for i, (start, end) in enumerate(regions)
                     if start - pad - TIMING_SLACK_S <= time <= end + pad + TIMING_SLACK_S), None)

    assert all(passage_of(c["start"] / SR) == passage_of(c["end"] / SR) is not None for c in chunks), chunks
    assert {passage_of(c["start"] / SR) for c in chunks} == set(range(len(regions)))

    our_text, their_text = ours["text"], "".join(s.text for s in theirs)
    our_wer, their_wer = word_error_rate(spoken, our_text), word_error_rate(spoken, their_text)
    agreement = 1 - word_error_rate(their_text, our_text)
    same_tokens = [s["tokens"] for s in ours["segments"]] == [s.tokens for s in theirs]
    time_difference = max((abs(a - b) for s, t in zip(ours["segments"], theirs)
                           for a, b in ((s["start"], t.start), (s["end"], t.end))), default=float("nan"))
    print(f"\nVAD transcripts, tiny.en, beam_size {beam_size}: {len(chunks)} speech chunks, {len(speech) / SR:.1f} s "
          f"of {len(audio) / SR:.1f} s; WER ours {our_wer:.3f}, faster-whisper {their_wer:.3f}; word agreement "
          f"{agreement:.3f}; segments {len(ours['segments'])} / {len(theirs)}; same tokens: {same_tokens}, "
          f"largest difference of segment times {time_difference:.2f} s")
    assert our_wer <= 0.2 and their_wer <= 0.2, (our_wer, their_wer, our_text, their_text)
    assert agreement >= 0.9, (our_text, their_text)

    # every segment starts and ends in a passage (with its padding); in both, segments start in every passage
    # (an end may lie in the next passage: restored from the joined speech, where the next passage follows at once)
    started = {}
    for name, times in (("ours", [(s["start"], s["end"]) for s in ours["segments"]]),
                        ("faster-whisper", [(s.start, s.end) for s in theirs])):
        assert times, f"no segments from {name}"
        for start, end in times:
            assert passage_of(start) is not None and passage_of(end) is not None and start <= end, \
                (name, start, end, regions)
        started[name] = {passage_of(start) for start, _ in times}
    assert started["ours"] == started["faster-whisper"] == set(range(len(regions))), started


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters, words", [
    (dict(threshold=1.5), "threshold"),
    (dict(threshold="high"), "threshold"),
    (dict(neg_threshold=0.6), "neg_threshold"),
    (dict(min_silence_duration_ms=-1), "min_silence_duration_ms"),
    (dict(speech_pad_ms=float("nan")), "speech_pad_ms"),
    (dict(min_speech_duration_ms=True), "min_speech_duration_ms"),
    (dict(max_speech_duration_s=0.5), "max_speech_duration_s"),
    (dict(window_size_samples=1024), "window_size_samples"),
])
def test_bad_parameters_are_refused_in_one_line(parameters, words):
    with pytest.raises(vad.VadError) as caught:
        vad.VadOptions.from_parameters(parameters)
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_bad_options_fail_before_any_work(tiny_runtime, audio):
    import runtime
    from runtime.decoding import DecodingError

    with pytest.raises(DecodingError, match="threshold"):
        runtime.transcribe(tiny_runtime, audio, vad_filter=True, vad_parameters={"threshold": 2}, **DECODE)
    with pytest.raises(DecodingError, match="clip_timestamps"):
        runtime.transcribe(tiny_runtime, audio, vad_filter=True, clip_timestamps="1,2", **DECODE)
    with pytest.raises(DecodingError, match="at most 30"):
        runtime.transcribe_batch(tiny_runtime, [audio], vad_filter=True, vad_parameters={"max_speech_duration_s": 60},
                                 condition_on_previous_text=False, **DECODE)


@pytest.fixture(scope="module")
def audio_file(work_dir, audio):
    import wave

    path = work_dir / "vad-layout.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SR)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.mark.parametrize("flags, words", [
    (["--vad-filter", "--vad-threshold", "2"], "--vad-threshold"),
    (["--vad-filter", "--vad-neg-threshold", "0.9"], "--vad-neg-threshold"),
    (["--vad-speech-pad-ms", "100"], "--vad-speech-pad-ms requires --vad-filter"),
    (["--vad-filter", "--clip-timestamps", "1,2"], "clip_timestamps"),
    (["--vad-filter", "--batch-size", "2", "--condition-on-previous-text", "False",
      "--vad-max-speech-duration-s", "45"], "--vad-max-speech-duration-s"),
])
def test_cli_refuses_bad_vad_options(tiny_model_dir, audio_file, tmp_path, flags, words):
    out = tmp_path / "out"
    result = run_tool("runtime", "transcribe", str(audio_file), "--model", str(tiny_model_dir), "-o", str(out),
                      *flags, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert not out.exists()


def test_altered_model_is_refused(tmp_path, audio):
    altered = tmp_path / "silero_vad_v6.onnx"
    data = bytearray(vad.model_path().read_bytes())
    data[len(data) // 2] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(vad.VadError, match="sha256") as caught:
        vad.load_vad_model(altered)
    assert vad.MODEL_SHA256 in str(caught.value) and "\n" not in str(caught.value)


def test_cli_with_altered_model_fails_in_one_line(tiny_model_dir, audio_file, tmp_path):
    altered = tmp_path / "silero_vad_v6.onnx"
    altered.write_bytes(vad.model_path().read_bytes()[:-10])
    out = tmp_path / "out"
    env = dict(os.environ, **{vad.MODEL_ENV: str(altered)})
    result = run_tool("runtime", "transcribe", str(audio_file), "--model", str(tiny_model_dir), "-o", str(out),
                      "--vad-filter", "--language", "en", check=False, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256" in lines[0], result.stderr
    assert not out.exists()


def test_missing_model_names_the_install(monkeypatch):
    import importlib.util

    monkeypatch.delenv(vad.MODEL_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(vad.VadError, match=r"pip install 'whisper-max\[vad\]'"):
        vad.model_path()


def test_vad_imports_no_torch_whisper_or_faster_whisper(audio_file):
    """The VAD runs on onnxruntime alone; faster-whisper's package only supplies the model file."""
    code = (
        "import sys\n"
        "from runtime.audio import load_audio\n"
        "from runtime.vad import speech_only\n"
        f"speech, chunks = speech_only(load_audio({str(audio_file)!r}))\n"
        "assert chunks, chunks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'whisper', 'faster_whisper', 'ctranslate2', 'av')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
