"""The runtime's decoding loop (runtime.decoding, runtime.longform) against openai-whisper.

Both sides run the same random-weight torch model: openai-whisper directly, the runtime through
tests/torch_inference.py. Same logits in, so the token ids, segments and timestamps must be
identical; log-probabilities may differ by float rounding only (whisper: float32 torch ops).
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
whisper = pytest.importorskip("whisper")

import whisper.decoding as wd  # noqa: E402

import runtime.longform as rtranscribe  # noqa: E402
from runtime import decoding as rd  # noqa: E402
from runtime.tokenizer import get_tokenizer  # noqa: E402

try:  # tests/ is on sys.path when it is not a package
    from audio_samples import synthesize_speech
    from checkpoints import TINY_DIMS, write_random_checkpoint
    from torch_inference import TorchInference
except ImportError:  # pragma: no cover
    from tests.audio_samples import synthesize_speech
    from tests.checkpoints import TINY_DIMS, write_random_checkpoint
    from tests.torch_inference import TorchInference

ASSETS = Path(whisper.__file__).parent / "assets"
VOCAB = ASSETS / "multilingual.tiktoken"
GPT2_VOCAB = ASSETS / "gpt2.tiktoken"
MEL_FILTERS = ASSETS / "mel_filters.npz"
TOL = 1e-4

needs_speech_tools = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None, reason="needs espeak-ng and ffmpeg")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny per-token ops: one thread is ~10x faster than two contending ones on this machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random.pt", TINY_DIMS, seed=0)
    return whisper.load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def english_model(tmp_path_factory):
    dims = dict(TINY_DIMS, n_vocab=51864, n_text_layer=2, n_audio_layer=2)
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt-en") / "tiny-en-random.pt", dims, seed=1)
    return whisper.load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def speech_path(tmp_path_factory):
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("needs espeak-ng and ffmpeg")
    return synthesize_speech(tmp_path_factory.mktemp("audio") / "speech.wav", n_sentences=15)


@pytest.fixture(scope="module")
def short_speech_path(tmp_path_factory):
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("needs espeak-ng and ffmpeg")
    return synthesize_speech(tmp_path_factory.mktemp("audio-short") / "short.wav", n_sentences=2)


@pytest.fixture(scope="module")
def speech(speech_path):
    audio = whisper.load_audio(str(speech_path))
    assert 60 < len(audio) / 16000 < 90  # three 30 s windows
    return audio


@pytest.fixture(scope="module")
def first_window(speech):
    mel = whisper.log_mel_spectrogram(torch.from_numpy(speech), 80)
    return whisper.pad_or_trim(mel, 3000)  # torch [80, 3000]


def _whisper_mel(audio, filters, padding=0):
    """openai-whisper's torch log-Mel, so loop parity does not depend on runtime.audio's rounding."""
    tensor = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    return whisper.log_mel_spectrogram(tensor, filters.shape[0], padding=padding).numpy()


class Runs:
    """Full transcriptions, cached per option set (each costs seconds of torch)."""

    def __init__(self, model, audio):
        self.model, self.audio = model, audio
        self.theirs_cache, self.ours_cache = {}, {}

    @staticmethod
    def _key(kw):
        return tuple(sorted((k, repr(v)) for k, v in kw.items()))

    def theirs(self, **kw):
        key = self._key(kw)
        if key not in self.theirs_cache:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                result = whisper.transcribe(self.model, self.audio, temperature=0.0, fp16=False, **kw)
            self.theirs_cache[key] = result, out.getvalue()
        return self.theirs_cache[key]

    def ours(self, **kw):
        key = self._key(kw)
        if key not in self.ours_cache:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), \
                    mock.patch.object(rtranscribe, "log_mel_spectrogram", _whisper_mel):
                result = rtranscribe.transcribe(TorchInference(self.model), self.audio, mel_filters=MEL_FILTERS,
                                                tokenizer_path=VOCAB, temperature=0.0, **kw)
            self.ours_cache[key] = result, out.getvalue()
        return self.ours_cache[key]


@pytest.fixture(scope="module")
def runs(model, speech):
    return Runs(model, speech)


def assert_same_transcription(ours: dict, theirs: dict):
    assert ours["language"] == theirs["language"]
    assert len(ours["segments"]) == len(theirs["segments"])
    for a, b in zip(ours["segments"], theirs["segments"]):
        where = f"segment {b['id']} (seek {b['seek']})"
        assert set(a) == set(b), where
        for key in ("id", "seek", "start", "end", "tokens", "text", "temperature", "compression_ratio"):
            assert a[key] == b[key], f"{where}: {key} {a[key]!r} != {b[key]!r}"
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=TOL), where
        assert a["no_speech_prob"] == pytest.approx(b["no_speech_prob"], abs=TOL), where
        if "words" in b:
            assert a["words"] == b["words"]
    assert ours["text"] == theirs["text"]


def assert_same_decoding(ours: rd.DecodingResult, theirs: wd.DecodingResult):
    assert ours.tokens == theirs.tokens
    assert ours.text == theirs.text
    assert ours.language == theirs.language
    assert ours.temperature == theirs.temperature
    assert ours.compression_ratio == theirs.compression_ratio
    assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=TOL)
    assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=TOL)


# ---------------------------------------------------------------------------- transcribe parity

TRANSCRIBE_CONFIGS = {
    "en-timestamps-conditioned-verbose": dict(language="en", verbose=True),
    "no-timestamps-unconditioned": dict(language="en", without_timestamps=True, condition_on_previous_text=False),
    "detect-language-unconditioned": dict(language=None, condition_on_previous_text=False, verbose=False,
                                          hallucination_silence_threshold=2.0),
    "initial-prompt-conditioned": dict(language="en", initial_prompt="Whisper, MAX graphs and numpy.",
                                       verbose=False),
    "carry-prompt-clips": dict(language="en", initial_prompt="Quick brown fox.", carry_initial_prompt=True,
                               clip_timestamps="2.5,40,45", verbose=True),
}


@pytest.mark.parametrize("name", list(TRANSCRIBE_CONFIGS))
def test_transcribe_equals_whisper(runs, name):
    kw = TRANSCRIBE_CONFIGS[name]
    theirs, theirs_stdout = runs.theirs(**kw)
    ours, ours_stdout = runs.ours(**kw)
    assert_same_transcription(ours, theirs)
    assert ours_stdout == theirs_stdout  # verbose lines, detected language
    if kw.get("verbose"):
        assert ours_stdout.count(" --> ") == len(ours["segments"])
    # the comparison is not vacuous: several windows, with text
    assert len({s["seek"] for s in theirs["segments"]}) >= 2
    assert any(s["text"].strip() for s in theirs["segments"])


def test_each_window_is_encoded_once(model, speech):
    """The window the language is detected on, and every temperature a window falls back to, decode
    from one encoding of the window (as faster-whisper reuses its detection's encoder output)."""
    inference = TorchInference(model)
    encoded, temperatures = [], []
    encode, decode = inference.encode, rtranscribe.decode

    def counted_encode(mel):
        encoded.append(mel.shape[0])
        return encode(mel)

    def counted_decode(model, mel, options, **kwargs):
        temperatures.append(options.temperature)
        return decode(model, mel, options, **kwargs)

    inference.encode = counted_encode
    # every window falls back once (an average log-probability is below 0), none counts as silent
    with mock.patch.object(rtranscribe, "decode", counted_decode), \
            mock.patch.object(rtranscribe, "log_mel_spectrogram", _whisper_mel):
        result = rtranscribe.transcribe(inference, speech, mel_filters=MEL_FILTERS, tokenizer_path=VOCAB,
                                        language=None, temperature=(0.0, 0.5), logprob_threshold=0.0,
                                        no_speech_threshold=None, condition_on_previous_text=False)
    windows = temperatures.count(0.0)
    assert windows >= 2 and temperatures.count(0.5) == windows
    assert result["language"] in rd.get_tokenizer(VOCAB, True).all_language_codes
    assert encoded == [1] * windows  # the detection's encoding is the first window's


def test_transcribe_options_take_effect(runs):
    """The configurations above differ from each other, so the parity tests cover distinct paths."""
    base, _ = runs.ours(**TRANSCRIBE_CONFIGS["en-timestamps-conditioned-verbose"])
    no_ts, _ = runs.ours(**TRANSCRIBE_CONFIGS["no-timestamps-unconditioned"])
    detected, stdout = runs.ours(**TRANSCRIBE_CONFIGS["detect-language-unconditioned"])
    prompted, _ = runs.ours(**TRANSCRIBE_CONFIGS["initial-prompt-conditioned"])
    clipped, _ = runs.ours(**TRANSCRIBE_CONFIGS["carry-prompt-clips"])

    tb = 50364
    assert any(t >= tb for s in base["segments"] for t in s["tokens"])
    assert not any(t >= tb for s in no_ts["segments"] for t in s["tokens"])
    # without timestamps, each window is one segment spanning the window
    assert [s["seek"] for s in no_ts["segments"]] == [0, 3000, 6000]
    assert detected["language"] in rd.get_tokenizer(VOCAB, True).all_language_codes
    assert stdout.startswith("Detected language: ")
    assert prompted["segments"] != base["segments"]
    # clips 2.5-40 s and 45 s-end: windows start at 2.5 s and at 45 s, none in 40-45 s
    seeks = sorted({s["seek"] for s in clipped["segments"]})
    assert seeks[0] == 250 and 4500 in seeks and not any(4000 <= seek < 4500 for seek in seeks)


@needs_speech_tools
def test_transcribe_end_to_end_from_path(runs, speech_path):
    """From the file, through runtime.audio's ffmpeg decoding and numpy log-Mel."""
    theirs, _ = runs.theirs(**TRANSCRIBE_CONFIGS["en-timestamps-conditioned-verbose"])
    with contextlib.redirect_stdout(io.StringIO()):
        ours = rtranscribe.transcribe(TorchInference(runs.model), str(speech_path), mel_filters=MEL_FILTERS,
                                      tokenizer_path=VOCAB, temperature=0.0, language="en", verbose=True)
    assert_same_transcription(ours, theirs)


def test_english_only_model(english_model, short_speech_path):
    audio = whisper.load_audio(str(short_speech_path))
    theirs = whisper.transcribe(english_model, audio, temperature=0.0, fp16=False, language=None)
    model = TorchInference(english_model)
    assert not model.is_multilingual
    with mock.patch.object(rtranscribe, "log_mel_spectrogram", _whisper_mel):
        ours = rtranscribe.transcribe(model, audio, mel_filters=MEL_FILTERS, tokenizer_path=GPT2_VOCAB,
                                      temperature=0.0)
    assert ours["language"] == "en"
    assert_same_transcription(ours, theirs)
    assert ours["segments"]


def test_temperature_fallback_samples(model, short_speech_path):
    """Random weights fail the log-prob threshold at every temperature: the last one is kept."""
    audio = whisper.load_audio(str(short_speech_path))

    def run(seed):
        return rtranscribe.transcribe(TorchInference(model), audio, mel_filters=MEL_FILTERS, tokenizer_path=VOCAB,
                                      language="en", temperature=(0.0, 0.6, 1.0), best_of=2, sample_len=16,
                                      rng=np.random.default_rng(seed))

    first, again, other = run(0), run(0), run(1)
    assert first["segments"] and all(s["temperature"] == 1.0 for s in first["segments"])
    assert all(s["avg_logprob"] < -1.0 for s in first["segments"])
    assert first == again  # seeded: reproducible
    assert [s["tokens"] for s in first["segments"]] != [s["tokens"] for s in other["segments"]]
    theirs = whisper.transcribe(model, audio, fp16=False, language="en", temperature=(0.0, 0.6, 1.0), best_of=2,
                                sample_len=16)
    assert all(s["temperature"] == 1.0 for s in theirs["segments"])


def test_transcribe_rejects_unsupported_and_bad_options(model, speech):
    inference = TorchInference(model)
    kw = dict(mel_filters=MEL_FILTERS, tokenizer_path=VOCAB)
    with pytest.raises(rd.DecodingError, match="no_such_option"):
        rtranscribe.transcribe(inference, speech, no_such_option=1, **kw)
    with pytest.raises(rd.DecodingError, match="clip_timestamps"):
        rtranscribe.transcribe(inference, speech, clip_timestamps="a,b", language="en", **kw)
    with pytest.raises(ValueError, match="Unsupported language"):
        rtranscribe.transcribe(inference, speech, language="klingon", **kw)
    assert inference.n_encode_calls == 0  # rejected before any work


# ---------------------------------------------------------------------------- decode parity (one window)

DECODE_CONFIGS = {
    "timestamps": dict(language="en", sample_len=64),
    "no-timestamps": dict(language="en", without_timestamps=True, sample_len=64),
    "detect": dict(language=None, sample_len=32),
    "prompt-prefix": dict(language="en", prompt="the previous window said this", prefix="And so", sample_len=48),
    "prompt-ids": dict(language="en", prompt=[50364, 440, 1723, 50414], sample_len=32),
    "no-suppression": dict(language="en", suppress_tokens="", suppress_blank=False, max_initial_timestamp=None,
                           sample_len=48),
    "suppress-list": dict(language="en", suppress_tokens=[11, 13, 2221], max_initial_timestamp=0.2,
                          sample_len=48),
    "translate-fr": dict(task="translate", language="fr", sample_len=32),
    "beam": dict(language="en", beam_size=3, sample_len=40),
    "beam-patience-penalty": dict(language="en", beam_size=2, patience=2.0, length_penalty=0.5,
                                  without_timestamps=True, sample_len=40),
}


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # in whisper's beam search
@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
def test_decode_equals_whisper(model, first_window, name):
    kw = DECODE_CONFIGS[name]
    theirs = whisper.decode(model, first_window, wd.DecodingOptions(fp16=False, **kw))
    ours = rd.decode(TorchInference(model), first_window.numpy(), rd.DecodingOptions(**kw), tokenizer_path=VOCAB)
    assert_same_decoding(ours, theirs)
    assert len(ours.tokens) > 0
    assert ours.sum_logprob == pytest.approx(ours.avg_logprob * (len(ours.tokens) + 1), rel=1e-6)


def test_decode_batch_and_language_detection(model, speech):
    mel = whisper.log_mel_spectrogram(torch.from_numpy(speech), 80)
    batch = torch.stack([whisper.pad_or_trim(mel[:, start:], 3000) for start in (0, 3000)])
    inference = TorchInference(model)

    their_tokens, their_probs = whisper.detect_language(model, batch)
    our_tokens, our_probs = rd.detect_language(inference, batch.numpy(), tokenizer_path=VOCAB)
    assert our_tokens.tolist() == their_tokens.tolist()
    for ours, theirs in zip(our_probs, their_probs):
        assert set(ours) == set(theirs)
        assert max(ours, key=ours.get) == max(theirs, key=theirs.get)
        assert max(abs(ours[k] - theirs[k]) for k in theirs) < TOL
        assert sum(ours.values()) == pytest.approx(1.0, abs=1e-4)

    token, probs = rd.detect_language(inference, batch[1].numpy(), tokenizer_path=VOCAB)
    assert token == int(their_tokens[1])  # (the encoder at batch 1 rounds a little differently)
    assert max(abs(probs[k] - our_probs[1][k]) for k in probs) < TOL

    options = dict(language=None, sample_len=24, without_timestamps=True)
    theirs = whisper.decode(model, batch, wd.DecodingOptions(fp16=False, **options))
    ours = rd.decode(inference, batch.numpy(), rd.DecodingOptions(**options), tokenizer_path=VOCAB)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert_same_decoding(a, b)
        assert a.language_probs is not None and max(a.language_probs, key=a.language_probs.get) == a.language

    lang_id = rd.decode(inference, batch.numpy(), task="lang_id", tokenizer_path=VOCAB)
    their_lang_id = whisper.decode(model, batch, wd.DecodingOptions(fp16=False, task="lang_id"))
    assert [r.language for r in lang_id] == [r.language for r in their_lang_id]
    assert all(r.tokens == [] for r in lang_id)


def test_english_only_decode_and_detection(english_model, first_window):
    inference = TorchInference(english_model)
    options = dict(language="en", sample_len=48)
    theirs = whisper.decode(english_model, first_window, wd.DecodingOptions(fp16=False, **options))
    ours = rd.decode(inference, first_window.numpy(), rd.DecodingOptions(**options), tokenizer_path=GPT2_VOCAB)
    assert_same_decoding(ours, theirs)
    with pytest.raises(rd.DecodingError, match="language tokens"):
        rd.detect_language(inference, first_window.numpy(), tokenizer_path=GPT2_VOCAB)


class _RecordingInference(TorchInference):
    """Records how the loop drives the protocol."""

    def decoder(self, audio_features, repeats=1):
        session = super().decoder(audio_features, repeats)
        calls = self.calls = []
        prefill, step = session.prefill, session.step

        def recording_prefill(tokens, positions):
            calls.append(("prefill", np.array(tokens), list(positions)))
            return prefill(tokens, positions)

        def recording_step(tokens):
            calls.append(("step", np.array(tokens)))
            return step(tokens)

        session.prefill, session.step = recording_prefill, recording_step
        return session


def test_protocol_usage(model, first_window):
    inference = _RecordingInference(model)
    result = rd.decode(inference, first_window.numpy(), language="en", prompt="some words", sample_len=10,
                       tokenizer_path=VOCAB)
    tokenizer = get_tokenizer(VOCAB, True, language="en", task="transcribe")
    kind, tokens, positions = inference.calls[0]
    expected_initial = [tokenizer.sot_prev] + tokenizer.encode(" some words") + list(tokenizer.sot_sequence)
    assert kind == "prefill" and tokens.tolist() == [expected_initial]
    assert positions == [expected_initial.index(tokenizer.sot), len(expected_initial) - 1]
    steps = inference.calls[1:]
    assert all(kind == "step" and t.shape == (1,) for kind, t, *_ in steps)
    assert len(result.tokens) == 10 and len(steps) == 9  # sample_len tokens, the last needs no step
    assert [int(t[0]) for _, t in steps] == result.tokens[:9]
    assert inference.n_encode_calls == 1


def test_sampling_best_of(model, first_window):
    inference = TorchInference(model)
    mel = first_window.numpy()
    options = rd.DecodingOptions(language="en", temperature=0.8, best_of=3, sample_len=24)
    a = rd.decode(inference, mel, options, tokenizer_path=VOCAB, rng=np.random.default_rng(7))
    b = rd.decode(inference, mel, options, tokenizer_path=VOCAB, rng=np.random.default_rng(7))
    c = rd.decode(inference, mel, options, tokenizer_path=VOCAB, rng=np.random.default_rng(8))
    greedy = rd.decode(inference, mel, language="en", sample_len=24, tokenizer_path=VOCAB)
    assert a == b
    assert a.tokens != c.tokens and a.tokens != greedy.tokens
    assert a.temperature == 0.8 and math.isfinite(a.avg_logprob) and a.avg_logprob < 0
    assert a.tokens[0] >= 50364  # the timestamp rules hold while sampling
    assert 0 < len(a.tokens) <= 24


def test_decode_option_errors(model, first_window):
    inference = TorchInference(model)
    mel = first_window.numpy()
    cases = [
        (dict(best_of=2), "best_of"),
        (dict(beam_size=2, best_of=2, temperature=0.5), "together"),
        (dict(patience=2.0), "patience"),
        (dict(length_penalty=2.0), "length_penalty"),
        (dict(temperature=-1.0), "temperature"),
        (dict(task="summarize"), "task"),
        (dict(language="klingon"), "klingon"),
        (dict(sample_len=0), "sample_len"),
    ]
    for kw, message in cases:
        with pytest.raises(rd.DecodingError, match=message) as info:
            rd.decode(inference, mel, rd.DecodingOptions(**kw), tokenizer_path=VOCAB)
        assert "\n" not in str(info.value)
    with pytest.raises(rd.DecodingError, match="unknown"):
        rd.decode(inference, mel, tokenizer_path=VOCAB, beam_sizes=3)
    with pytest.raises(rd.DecodingError, match="shape"):
        rd.decode(inference, mel[:, :100], tokenizer_path=VOCAB)
    with pytest.raises(rd.DecodingError, match="tokenizer_path"):
        rd.decode(inference, mel)
    assert inference.n_encode_calls == 0


def test_decoding_options_are_whispers():
    ours = {f: getattr(rd.DecodingOptions(), f) for f in rd.DecodingOptions.__dataclass_fields__}
    theirs = {f: getattr(wd.DecodingOptions(), f) for f in wd.DecodingOptions.__dataclass_fields__}
    assert ours == theirs
    with pytest.raises(Exception):
        rd.DecodingOptions().temperature = 1.0  # frozen


def test_initial_tokens_and_suppression_equal_whispers(model):
    inference = TorchInference(model)
    variants = [
        dict(),
        dict(without_timestamps=True, prompt="x " * 400, prefix="y " * 400, sample_len=100),
        dict(prompt=list(range(300)), language="de", task="translate"),
        dict(suppress_tokens="1,2,-1", prefix=[5, 6, 7]),
        dict(suppress_tokens=[3, 4]),
        dict(suppress_tokens=None, suppress_blank=False),
    ]
    for kw in variants:
        theirs = wd.DecodingTask(model, wd.DecodingOptions(fp16=False, **kw))
        ours = rd.DecodingTask(inference, rd.DecodingOptions(**kw), tokenizer_path=VOCAB)
        assert ours.initial_tokens == theirs.initial_tokens, kw
        assert (ours.sample_begin, ours.sot_index, ours.sample_len, ours.n_group) == \
            (theirs.sample_begin, theirs.sot_index, theirs.sample_len, theirs.n_group)
        their_filters = [type(f).__name__ for f in theirs.logit_filters]
        assert [type(f).__name__ for f in ours.logit_filters] == their_filters, kw
        if "SuppressTokens" in their_filters:
            assert list(ours._suppress_tokens()) == list(theirs._get_suppress_tokens())


# ---------------------------------------------------------------------------- logit filters on crafted logits


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(VOCAB, True, language="en", task="transcribe")


@pytest.fixture(scope="module")
def their_tokenizer():
    return whisper.tokenizer.get_tokenizer(True, num_languages=99, language="en", task="transcribe")


def _crafted_logits(n_rows, seed, timestamp_boost=0.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n_rows, 51865)).astype(np.float32)
    logits[:, 50364:] += np.float32(timestamp_boost)
    return logits


def _both_apply(ours, theirs, logits, tokens):
    mine = logits.copy()
    ours.apply(mine, tokens)
    reference = torch.from_numpy(logits.copy())
    theirs.apply(reference, torch.from_numpy(tokens))
    np.testing.assert_array_equal(np.isneginf(mine), np.isneginf(reference.numpy()))
    np.testing.assert_array_equal(mine, reference.numpy())
    return mine


def test_timestamp_rules(tokenizer, their_tokenizer):
    tb, eot = tokenizer.timestamp_begin, tokenizer.eot
    sot_seq = list(tokenizer.sot_sequence)
    begin = len(sot_seq)
    ours = rd.ApplyTimestampRules(tokenizer, begin, 50)
    theirs = wd.ApplyTimestampRules(their_tokenizer, begin, 50)
    text = 1000

    def rows(*sampled):
        width = max(len(s) for s in sampled)
        assert all(len(s) == width for s in sampled)
        return np.array([sot_seq + list(s) for s in sampled], dtype=np.int64)

    # at the start: only timestamps 0.00 .. 1.00 s
    out = _both_apply(ours, theirs, _crafted_logits(2, 0), rows([], []))
    allowed = np.flatnonzero(np.isfinite(out[0]))
    assert allowed.min() >= tb and allowed.max() <= tb + 50

    # row 0: <|0.20|> text text <|1.00|> -- a lone timestamp after text: a timestamp >= 1.00 or EOT
    # row 1: <|0.20|> text <|1.00|> <|1.00|> -- a pair closed: text next
    # row 2: <|0.20|> text text text -- text, EOT or a timestamp after 0.20
    # row 3: <|0.20|> <|0.40|> text text -- text, EOT or a timestamp after 0.40
    tokens = rows([tb + 10, text, text, tb + 50], [tb + 10, text, tb + 50, tb + 50], [tb + 10, text, text, text],
                  [tb + 10, tb + 20, text, text])
    out = _both_apply(ours, theirs, _crafted_logits(4, 1), tokens)
    finite = [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]
    assert not any(t < eot for t in finite[0])  # no text after a lone timestamp
    assert all(t >= tb + 50 for t in finite[0] if t >= tb)
    assert finite[0]
    assert not any(t >= tb for t in finite[1])  # text after a closed pair
    assert any(t < eot for t in finite[1])
    assert not any(tb <= t <= tb + 10 for t in finite[2])  # timestamps must advance past 0.20
    assert not any(tb <= t <= tb + 20 for t in finite[3])
    assert all(np.isneginf(out[:, tokenizer.no_timestamps]))


@pytest.mark.parametrize("boost", [-4.0, 0.0, 4.0, 8.0])
def test_timestamp_probability_rule(tokenizer, their_tokenizer, boost):
    """When the timestamps together outweigh the best text token, a timestamp must be sampled."""
    begin = len(tokenizer.sot_sequence)
    ours = rd.ApplyTimestampRules(tokenizer, begin, None)
    theirs = wd.ApplyTimestampRules(their_tokenizer, begin, None)
    tokens = np.array([list(tokenizer.sot_sequence) + [tokenizer.timestamp_begin + 3, 1000]] * 3, dtype=np.int64)
    logits = _crafted_logits(3, 2, boost)
    out = _both_apply(ours, theirs, logits, tokens)
    tb = tokenizer.timestamp_begin
    for row, raw in zip(out, logits):
        lp = rd.log_softmax(np.where(np.arange(raw.size) == tokenizer.no_timestamps, -np.inf, raw))
        lp_ts = np.where(np.arange(raw.size)[tb:] <= 3, -np.inf, lp[tb:])  # timestamps <= last are masked
        stamps_win = rd.logsumexp(lp_ts) > lp[:tb].max()
        assert np.all(np.isneginf(row[:tb])) == stamps_win
    if boost >= 8.0:
        assert np.all(np.isneginf(out[:, :tb]))
    if boost <= -4.0:
        assert np.any(np.isfinite(out[:, :tb]))


def test_suppress_blank_and_tokens(tokenizer, their_tokenizer):
    begin = len(tokenizer.sot_sequence)
    logits = _crafted_logits(2, 3)
    at_start = np.tile(np.array(tokenizer.sot_sequence, dtype=np.int64), (2, 1))
    later = np.concatenate([at_start, np.full((2, 1), 1000)], axis=1)
    blank = rd.SuppressBlank(tokenizer, begin)
    out = _both_apply(blank, wd.SuppressBlank(their_tokenizer, begin), logits, at_start)
    assert np.isneginf(out[:, 220]).all() and np.isneginf(out[:, tokenizer.eot]).all()
    assert np.isfinite(np.delete(out, [220, tokenizer.eot], axis=1)).all()
    out = _both_apply(blank, wd.SuppressBlank(their_tokenizer, begin), logits, later)
    np.testing.assert_array_equal(out, logits)

    ids = [5, 220, 50257, 51000]
    out = _both_apply(rd.SuppressTokens(ids), wd.SuppressTokens(ids), logits, later)
    assert np.isneginf(out[:, ids]).all() and np.isfinite(np.delete(out, ids, axis=1)).all()


def test_greedy_decoder_update_and_finalize():
    eot = 50257
    decoder = rd.GreedyDecoder(0.0, eot)
    logits = np.full((3, 50300), -1.0, dtype=np.float32)
    logits[0, 7] = 5.0
    logits[1, eot] = 5.0
    logits[2, 9] = 5.0
    tokens = np.array([[1, 2], [1, 2], [1, eot]], dtype=np.int64)
    sums = np.zeros(3, dtype=np.float32)
    tokens, completed = decoder.update(tokens, logits, sums)
    assert tokens[:, -1].tolist() == [7, eot, eot] and not completed
    expected = float(rd.log_softmax(logits[0])[7])
    assert sums[0] == pytest.approx(expected) and sums[1] == pytest.approx(expected) and sums[2] == 0.0
    assert sums.dtype == np.float32
    logits[0, 7], logits[0, eot] = -1.0, 5.0
    tokens, completed = decoder.update(tokens, logits, sums)
    assert completed and tokens.shape == (3, 4)
    groups, group_sums = decoder.finalize(tokens.reshape(3, 1, -1), sums.reshape(3, 1))
    assert all(g[0][-1] == eot for g in groups) and [len(g[0]) for g in groups] == [5, 5, 5]
    assert isinstance(group_sums[0][0], float)


def test_sampling_matches_the_softmax_distribution():
    logits = np.array([[2.0, 1.0, 0.0, -np.inf, 0.5]], dtype=np.float32)
    temperature = 0.7
    decoder = rd.GreedyDecoder(temperature, eot=4, rng=np.random.default_rng(123))
    draws = np.array([decoder._sample(logits)[0] for _ in range(20000)])
    expected = rd.softmax(logits[0] / temperature)
    frequencies = np.bincount(draws, minlength=5) / draws.size
    assert frequencies[3] == 0.0  # -inf is never drawn
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


@pytest.mark.parametrize("length_penalty", [None, 0.0, 0.6, 1.0])
def test_ranker_equals_whispers(length_penalty):
    rng = np.random.default_rng(0)
    tokens = [[np.arange(n) for n in rng.integers(1, 40, size=5)] for _ in range(3)]
    sums = [list(rng.uniform(-60, -1, size=5)) for _ in range(3)]
    theirs = wd.MaximumLikelihoodRanker(length_penalty).rank([[torch.from_numpy(t) for t in g] for g in tokens], sums)
    assert rd.MaximumLikelihoodRanker(length_penalty).rank(tokens, sums) == [int(i) for i in theirs]


def test_top_k_equals_a_stable_sort():
    rng = np.random.default_rng(0)
    for k in (1, 3, 6):
        for _ in range(50):
            row = rng.integers(-4, 4, size=300).astype(np.float32)  # many exact ties
            row[rng.integers(0, 300, size=40)] = -np.inf
            np.testing.assert_array_equal(rd._top_k(row, k), np.argsort(-row, kind="stable")[:k])
    short = np.array([0.5, -np.inf, 0.5], dtype=np.float32)
    assert rd._top_k(short, 6).tolist() == [0, 2, 1]
    nan_row = np.full(10, np.nan, dtype=np.float32)
    assert rd._top_k(nan_row, 3).tolist() == [0, 1, 2]


class _RecordingReorder:
    """Stands in for openai-whisper's inference (rearrange_kv_cache) and our session (reorder)."""

    def __init__(self):
        self.calls = []

    def rearrange_kv_cache(self, source_indices):
        self.calls.append(list(source_indices))


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # in whisper's beam search
@pytest.mark.parametrize("beam_size, patience", [(3, None), (2, 2.0), (4, 0.5)])
def test_beam_decoder_equals_whispers_on_random_logits(beam_size, patience):
    """Two audios in one batch, EOT made likely so that beams finish at different steps: the kept
    beams, their order, the cache reorders, the finished candidates and finalize all equal whisper's."""
    rng = np.random.default_rng(beam_size)
    n_audio, n_vocab, eot = 2, 1000, 999
    theirs_reorder, ours_reorder = _RecordingReorder(), _RecordingReorder()
    theirs = wd.BeamSearchDecoder(beam_size, eot, theirs_reorder, patience)
    ours = rd.BeamSearchDecoder(beam_size, eot, ours_reorder.rearrange_kv_cache, patience)
    theirs.reset()
    ours.reset()
    start = np.tile(np.array([[7, 8, 9]], dtype=np.int64), (n_audio * beam_size, 1))
    their_tokens, our_tokens = torch.from_numpy(start.copy()), start.copy()
    their_sums, our_sums = torch.zeros(n_audio * beam_size), np.zeros(n_audio * beam_size, dtype=np.float32)
    for step in range(30):
        logits = rng.normal(0.0, 2.0, size=(n_audio * beam_size, n_vocab)).astype(np.float32)
        logits[:, eot] += rng.uniform(0.0, 6.0, size=n_audio * beam_size).astype(np.float32)
        their_tokens, their_done = theirs.update(their_tokens, torch.from_numpy(logits.copy()), their_sums)
        our_tokens, our_done = ours.update(our_tokens, logits.copy(), our_sums)
        assert our_tokens.tolist() == their_tokens.tolist(), f"step {step}"
        np.testing.assert_allclose(our_sums, their_sums.numpy(), rtol=1e-6)
        assert [list(s) for s in ours.finished_sequences] == [list(s) for s in theirs.finished_sequences]
        assert our_done == their_done
        if our_done:
            break
    assert ours_reorder.calls == [c for c in theirs_reorder.calls if c != list(range(len(c)))]
    assert any(len(s) for s in ours.finished_sequences), "no beam finished: the test compares too little"

    shape = (n_audio, beam_size, -1)
    their_candidates, their_lps = theirs.finalize(their_tokens.reshape(shape), their_sums.reshape(n_audio, beam_size))
    our_candidates, our_lps = ours.finalize(our_tokens.reshape(shape), our_sums.reshape(n_audio, beam_size))
    assert [[t.tolist() for t in g] for g in our_candidates] == [[t.tolist() for t in g] for g in their_candidates]
    np.testing.assert_allclose(np.concatenate(our_lps), np.concatenate(their_lps), rtol=1e-6)


class _ScriptedInference:
    """A model whose row r spells script[r], then EOT: at each step the scripted token's logit is
    strength[r][k] and every other logit 0. At temperature 0.01 that makes sampling certain (so
    whisper's torch sampler and our numpy one draw the same tokens), while the log-probabilities
    (at temperature 1) stay far from 0 and differ between rows."""

    def __init__(self, scripts, strengths, eot, dims):
        self.scripts, self.strengths, self.eot, self.dims = scripts, strengths, eot, dims
        self.is_multilingual, self.num_languages = True, 99
        self.repeats = []

    def logits(self, step: int) -> np.ndarray:
        out = np.zeros((len(self.scripts), self.dims.n_vocab), dtype=np.float32)
        for r, (script, strength) in enumerate(zip(self.scripts, self.strengths)):
            out[r, script[step] if step < len(script) else self.eot] = strength[min(step, len(strength) - 1)]
        return out

    def encode(self, mel):
        return type("Features", (), {"batch_size": mel.shape[0]})()

    def decoder(self, features, repeats=1):
        self.repeats.append(repeats)
        model, state = self, {"step": 0}

        class Session:
            def prefill(self, tokens, positions):
                assert tokens.shape[0] == len(model.scripts)
                return np.stack([np.zeros_like(model.logits(0)), model.logits(0)], axis=1)

            def step(self, tokens):
                state["step"] += 1
                return model.logits(state["step"])

            def reorder(self, source_indices):
                raise AssertionError("sampling never reorders")

        return Session()


def test_best_of_sampling_ranks_candidates_as_whisper(model):
    """best_of samples best_of candidates and keeps the one openai-whisper's ranker keeps, with and
    without a length penalty; sum and average log-probabilities as whisper's GreedyDecoder gives."""
    from runtime.inference import ModelDimensions

    dims = ModelDimensions(**vars(model.dims))
    tokenizer = get_tokenizer(VOCAB, True, language="en", task="transcribe")
    eot, temperature = tokenizer.eot, 0.01
    scripts = [[440, 1029], [264, 2221, 1550, 300, 2633], [11, 13, 340, 450, 560, 670, 780, 890], [5, 6, 7]]
    rng = np.random.default_rng(3)
    strengths = [list(rng.uniform(9.0, 14.0, size=len(s) + 1)) for s in scripts]
    initial = list(tokenizer.sot_sequence_including_notimestamps)

    def whispers_choice(length_penalty):
        decoder = wd.GreedyDecoder(temperature, eot)
        fake = _ScriptedInference(scripts, strengths, eot, dims)
        tokens = torch.tensor([initial] * len(scripts))
        sums = torch.zeros(len(scripts))
        for step in range(20):
            tokens, completed = decoder.update(tokens, torch.from_numpy(fake.logits(step)), sums)
            if completed:
                break
        candidates, lps = decoder.finalize(tokens.reshape(1, len(scripts), -1), sums.reshape(1, -1))
        candidates = [[t[len(initial): (t == eot).nonzero()[0, 0]] for t in g] for g in candidates]
        (best,) = wd.MaximumLikelihoodRanker(length_penalty).rank(candidates, lps)
        return candidates[0][best].tolist(), lps[0][best]

    chosen = set()
    for length_penalty in (None, 0.0, 1.0):
        fake = _ScriptedInference(scripts, strengths, eot, dims)
        result = rd.decode(fake, np.zeros((dims.n_mels, 3000), dtype=np.float32), tokenizer_path=VOCAB,
                           language="en", without_timestamps=True, suppress_tokens="", temperature=temperature,
                           best_of=len(scripts), length_penalty=length_penalty, rng=np.random.default_rng(0))
        expected_tokens, expected_sum = whispers_choice(length_penalty)
        assert fake.repeats == [len(scripts)]  # one pass, best_of rows
        assert result.tokens == expected_tokens and result.tokens in scripts
        # whisper's float32 log-softmax over 51865 logits rounds at about 1e-5 per token
        assert result.sum_logprob == pytest.approx(expected_sum, abs=TOL)
        assert result.avg_logprob == pytest.approx(expected_sum / (len(expected_tokens) + 1), abs=TOL)
        assert result.temperature == temperature
        chosen.add(tuple(result.tokens))
    assert len(chosen) >= 2, "the length penalty should change the pick, or the ranking is not tested"


def test_compression_ratio_and_timestamp_format():
    from whisper.utils import compression_ratio, format_timestamp

    for text in ["", "hello hello hello hello hello hello", "Ünïcödé text that does not repeat much"]:
        assert rd.compression_ratio(text) == compression_ratio(text)
    for seconds in [0.0, 0.004, 1.5, 59.9996, 61.02, 3600.5, 7322.123]:
        assert rtranscribe.format_timestamp(seconds) == format_timestamp(seconds)
        assert rtranscribe.format_timestamp(seconds, True, ",") == format_timestamp(seconds, True, ",")


# ---------------------------------------------------------------------------- the seek loop on scripted decodings

TB = 50364  # <|0.00|> of the multilingual vocabulary

# per window: {temperature: (tokens, avg_logprob, no_speech_prob, compression_ratio)}; a temperature
# missing from a window's script repeats its last entry
SCRIPT = [
    # window 0 (seek 0): fails on log-prob at T=0, passes at 0.2; ends on text -> seek to <|12.00|>
    {0.0: ([TB, 100, TB + 150], -2.0, 0.1, 1.2),
     0.2: ([TB, 100, 200, TB + 150, TB + 150, 300, TB + 500, TB + 500, 220, TB + 600, TB + 600, 400], -0.5, 0.1, 1.3)},
    # window 1 (seek 1200): silence (no-speech and low log-prob): skipped, a whole window on
    {0.0: ([TB, 500, TB + 20], -2.0, 0.9, 1.0)},
    # window 2 (seek 4200): a lone last timestamp without pairs: one segment ending there
    {0.0: ([TB, 500, 600, TB + 300], -0.3, 0.2, 1.1)},
    # window 3 (seek 7200): too repetitive until T=0.6 -> the prompt is reset afterwards
    {0.0: ([TB, 700, TB + 100], -0.3, 0.0, 3.0), 0.2: ([TB, 701, TB + 100], -0.3, 0.0, 2.5),
     0.4: ([TB, 702, TB + 100], -0.3, 0.0, 2.6),
     0.6: ([TB, 703, TB + 100, TB + 100, 800, TB + 250], -0.4, 0.0, 1.5)},
    # window 4 (seek 10200, 8 s left): nothing decoded
    {0.0: ([], -0.5, 0.3, 0.5)},
]


class _Scripted:
    """Plays SCRIPT as the result of each decode call, recording what the loop asked for."""

    def __init__(self, first_temperature=0.0):
        self.window = -1
        self.first_temperature = first_temperature
        self.calls = []

    def result(self, temperature, options_prompt, mel_shape):
        if temperature == self.first_temperature:
            self.window += 1
        script = SCRIPT[self.window]
        key = max((t for t in script if t <= temperature), default=min(script))
        tokens, avg_logprob, no_speech_prob, ratio = script[key]
        self.calls.append((self.window, temperature, list(options_prompt or []), tuple(mel_shape)))
        return tokens, avg_logprob, no_speech_prob, ratio


class _EncodedWindows:
    """A scripted model's audio features: the log-mel windows it was given."""

    def __init__(self, mel):
        self.mel = mel
        self.batch_size = mel.shape[0]


def _scripted_theirs(kw):
    script = _Scripted()
    tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=99, language="en", task="transcribe")

    class FakeWhisper:
        dims = whisper.model.ModelDimensions(**TINY_DIMS)
        device = torch.device("cpu")
        is_multilingual = True
        num_languages = 99

        def decode(self, mel, options):
            tokens, avg, nsp, ratio = script.result(options.temperature, options.prompt, mel.shape)
            return wd.DecodingResult(audio_features=None, language=options.language, tokens=tokens,
                                     text=tokenizer.decode(tokens).strip(), avg_logprob=avg, no_speech_prob=nsp,
                                     temperature=options.temperature, compression_ratio=ratio)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = whisper.transcribe(FakeWhisper(), np.zeros(16000 * 110, np.float32), fp16=False, **kw)
    return result, out.getvalue(), script.calls


def _scripted_ours(kw):
    script = _Scripted()
    tokenizer = get_tokenizer(VOCAB, True, language="en", task="transcribe")

    def fake_decode(model, mel, options, *, tokenizer_path, rng):
        if isinstance(mel, _EncodedWindows):  # the loop encodes a window once for all its temperatures
            assert mel.mel.shape[0] == 1
            mel = mel.mel[0]
        assert mel.shape == (80, 3000) and mel.dtype == np.float32
        tokens, avg, nsp, ratio = script.result(options.temperature, options.prompt, mel.shape)
        return rd.DecodingResult(language=options.language, tokens=tokens, text=tokenizer.decode(tokens).strip(),
                                 avg_logprob=avg, no_speech_prob=nsp, temperature=options.temperature,
                                 compression_ratio=ratio)

    from runtime.inference import ModelDimensions

    model = mock.Mock(dims=ModelDimensions(**TINY_DIMS), is_multilingual=True, num_languages=99,
                      encode=_EncodedWindows)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.object(rtranscribe, "decode", fake_decode):
        result = rtranscribe.transcribe(model, np.zeros(16000 * 110, np.float32), mel_filters=MEL_FILTERS,
                                        tokenizer_path=VOCAB, **kw)
    return result, out.getvalue(), script.calls


@pytest.mark.parametrize("kw", [
    dict(language="en", verbose=True, initial_prompt="Once upon a time"),
    dict(language="en", verbose=True, initial_prompt="Once upon a time", carry_initial_prompt=True),
    dict(language="en", verbose=False, condition_on_previous_text=False),
    dict(language="en", verbose=None, clip_timestamps=[5.0, 20.0, 42.5]),
    dict(language="en", no_speech_threshold=None, logprob_threshold=None, compression_ratio_threshold=2.55),
], ids=["prompt", "carry-prompt", "unconditioned", "clips", "thresholds"])
def test_seek_loop_equals_whispers_on_scripted_decodings(kw):
    theirs, their_stdout, their_calls = _scripted_theirs(dict(kw))
    ours, our_stdout, our_calls = _scripted_ours(dict(kw))
    assert our_calls == their_calls  # same windows, temperatures and prompts
    assert ours == theirs  # every key and value, incl. cleared segments' "words"
    assert our_stdout == their_stdout
    assert len(ours["segments"]) >= 3


def test_seek_loop_walks_the_script():
    """What the scripted run must do, spelled out (guards the script itself)."""
    result, stdout, calls = _scripted_ours(dict(language="en", verbose=True, initial_prompt="Once upon a time"))
    assert [(w, t) for w, t, _, _ in calls] == [(0, 0.0), (0, 0.2), (1, 0.0), (2, 0.0), (3, 0.0), (3, 0.2),
                                                (3, 0.4), (3, 0.6), (4, 0.0)]
    prompt = get_tokenizer(VOCAB, True).encode(" Once upon a time")
    assert calls[0][2] == prompt
    assert calls[-1][2] == []  # reset after the T=0.6 window
    segments = result["segments"]
    assert [(s["seek"], s["start"], s["end"]) for s in segments[:3]] == [(0, 0.0, 3.0), (0, 3.0, 10.0), (0, 10.0, 12.0)]
    assert segments[2]["text"] == "" and segments[2]["tokens"] == [] and segments[2]["words"] == []  # blank: cleared
    assert not any(s["seek"] == 1200 for s in segments)  # the silent window
    assert [(s["seek"], s["start"], s["end"]) for s in segments if s["seek"] == 4200] == [(4200, 42.0, 48.0)]
    assert segments[-1]["seek"] == 10200 and segments[-1]["end"] == pytest.approx(110.0)
    assert segments[-1]["tokens"] == []
    assert stdout.count("-->") == len(segments)
