"""runtime.audio against openai-whisper's whisper.audio (the reference; used only in tests)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import audio
from runtime.audio import AudioError, load_audio, load_mel_filters, log_mel_spectrogram, pad_or_trim
try:  # tests/ is on sys.path when it is not a package (pytest's default rootdir-less import)
    from audio_samples import convert_audio, synthesize_speech
except ImportError:  # tests/ made a package
    from tests.audio_samples import convert_audio, synthesize_speech

whisper_audio = pytest.importorskip("whisper.audio")
torch = pytest.importorskip("torch")

WHISPER_MEL_FILTERS = Path(whisper_audio.__file__).parent / "assets" / "mel_filters.npz"

# Largest |runtime - whisper| allowed in the log-Mel values (which span about -1 .. 2). Our STFT is
# float64; whisper's is float32, so the difference is torch's own rounding (measured ~4.6e-5).
MEL_MAX_ABS_TOL = 1e-4
MEL_MEAN_ABS_TOL = 1e-6


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def speech_wav(speech_dir) -> Path:
    return synthesize_speech(speech_dir / "speech.wav", n_sentences=3)


FORMATS = {
    "mp3": ("speech.mp3", ["-ar", "44100", "-ac", "2", "-codec:a", "libmp3lame", "-b:a", "96k"]),
    "ogg_vorbis": ("speech_vorbis.ogg", ["-ar", "22050", "-ac", "1", "-codec:a", "libvorbis"]),
    "ogg_opus": ("speech_opus.ogg", ["-ar", "48000", "-ac", "1", "-codec:a", "libopus"]),
    "wav_8k_mono": ("speech_8k.wav", ["-ar", "8000", "-ac", "1"]),
    "wav_44k_stereo": ("speech_44k.wav", ["-ar", "44100", "-ac", "2"]),
    "flac_44k_stereo": ("speech_44k.flac", ["-ar", "44100", "-ac", "2"]),
}


@pytest.fixture(scope="session")
def encoded(speech_dir, speech_wav):
    return {name: convert_audio(speech_wav, speech_dir / filename, args) for name, (filename, args) in FORMATS.items()}


@pytest.fixture(scope="session")
def speech_samples(speech_wav) -> np.ndarray:
    return whisper_audio.load_audio(str(speech_wav))


# --- constants ---------------------------------------------------------------------------------


def test_constants_match_whisper():
    for name in ("SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_LENGTH", "N_SAMPLES", "N_FRAMES",
                 "N_SAMPLES_PER_TOKEN", "FRAMES_PER_SECOND", "TOKENS_PER_SECOND"):
        assert getattr(audio, name) == getattr(whisper_audio, name), name
    assert (audio.N_SAMPLES, audio.N_FRAMES, audio.TOKENS_PER_SECOND) == (480000, 3000, 50)


# --- load_audio --------------------------------------------------------------------------------


def test_load_audio_wav_equals_whisper(speech_wav, speech_samples):
    ours = load_audio(speech_wav)  # a Path works too
    assert ours.dtype == np.float32 and ours.ndim == 1
    assert 10 * audio.SAMPLE_RATE < ours.size < 20 * audio.SAMPLE_RATE  # 3 sentences, ~14 s
    assert np.array_equal(ours, speech_samples)
    assert np.abs(ours).max() > 0.05  # it is speech, not silence
    assert ours.min() >= -1.0 and ours.max() < 1.0


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_audio_equals_whisper(encoded, name):
    path = str(encoded[name])
    expected = whisper_audio.load_audio(path)
    ours = load_audio(path)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    assert np.array_equal(ours, expected)


def test_load_audio_other_rate_equals_whisper(encoded):
    path = str(encoded["wav_44k_stereo"])
    ours = load_audio(path, sr=8000)
    assert np.array_equal(ours, whisper_audio.load_audio(path, sr=8000))
    assert abs(ours.size - load_audio(path).size / 2) <= 2


def _streamed(source, **kwargs):
    """stream_audio's blocks joined; small reads, so a file comes in many blocks."""
    return np.concatenate(list(audio.stream_audio(source, block_bytes=kwargs.pop("block_bytes", 4096), **kwargs)))


@pytest.fixture(params=["load_audio", "stream_audio"])
def loader(request):
    """load_audio, or stream_audio's blocks joined: the same samples and the same errors."""
    return load_audio if request.param == "load_audio" else _streamed


def _assert_one_line_audio_error(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    return message


def test_missing_file(loader, tmp_path):
    path = tmp_path / "does_not_exist.wav"
    with pytest.raises(AudioError) as excinfo:
        loader(path)
    assert "not found" in _assert_one_line_audio_error(excinfo, path)


def test_directory(loader, tmp_path):
    with pytest.raises(AudioError) as excinfo:
        loader(tmp_path)
    assert "directory" in _assert_one_line_audio_error(excinfo, tmp_path)


def test_fifo_is_refused_not_hung(loader, tmp_path):
    path = tmp_path / "pipe.wav"
    os.mkfifo(path)  # ffmpeg would wait forever for a writer
    with pytest.raises(AudioError) as excinfo:
        loader(path)
    assert "not a regular file" in _assert_one_line_audio_error(excinfo, path)


def test_random_bytes(loader, tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(1234).bytes(20000))
    with pytest.raises(AudioError) as excinfo:
        loader(path)
    message = _assert_one_line_audio_error(excinfo, path)
    assert "ffmpeg cannot decode" in message
    # ffmpeg's own last stderr line is passed on
    stderr = subprocess.run(["ffmpeg", "-nostdin", "-i", str(path), "-f", "s16le", "-"],
                            capture_output=True, text=True).stderr
    last_line = [line for line in stderr.splitlines() if line.strip()][-1].strip()
    assert message.endswith(last_line)


def test_empty_file(loader, tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as excinfo:
        loader(path)
    assert "empty" in _assert_one_line_audio_error(excinfo, path)


def test_zero_sample_container(loader, tmp_path, speech_wav):
    path = convert_audio(speech_wav, tmp_path / "zero.wav", ["-t", "0"])
    assert path.stat().st_size > 0  # a valid WAV header, no samples
    assert whisper_audio.load_audio(str(path)).size == 0  # whisper returns an empty array here
    with pytest.raises(AudioError) as excinfo:
        loader(path)
    assert "0 samples" in _assert_one_line_audio_error(excinfo, path)


def test_ffmpeg_not_installed(loader, tmp_path, monkeypatch, speech_wav):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ffmpeg
    with pytest.raises(AudioError) as excinfo:
        loader(speech_wav)
    assert "apt-get install ffmpeg" in _assert_one_line_audio_error(excinfo, speech_wav)


def test_audio_error_is_value_error():
    assert issubclass(AudioError, ValueError)


def test_bad_sample_rate(loader, speech_wav):
    with pytest.raises(ValueError, match="sample rate"):
        loader(speech_wav, sr=0)


# --- mel filters -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_load_mel_filters_equals_whisper(n_mels):
    ours = load_mel_filters(WHISPER_MEL_FILTERS, n_mels)
    expected = whisper_audio.mel_filters("cpu", n_mels).numpy()
    assert ours.dtype == np.float32
    assert ours.shape == (n_mels, 1 + audio.N_FFT // 2)
    assert np.array_equal(ours, expected)


def test_load_mel_filters_errors(tmp_path):
    with pytest.raises(AudioError, match="n_mels=40"):
        load_mel_filters(WHISPER_MEL_FILTERS, 40)
    missing = tmp_path / "missing.npz"
    with pytest.raises(AudioError, match="not found"):
        load_mel_filters(missing, 80)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(AudioError, match="not a readable") as excinfo:
        load_mel_filters(garbage, 80)
    assert "\n" not in str(excinfo.value)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mel_80=np.zeros((80, 200), np.float32))
    with pytest.raises(AudioError, match="shape"):
        load_mel_filters(wrong, 80)


# --- pad_or_trim -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,length,axis", [
    ((1000,), 480, -1),        # trim
    ((1000,), 1500, -1),       # pad
    ((1000,), 1000, -1),       # unchanged
    ((80, 3500), 3000, -1),    # trim frames of a mel
    ((80, 2000), 3000, -1),    # pad frames of a mel
    ((5, 7), 9, 0),            # pad along the first axis
    ((5, 7), 2, 0),            # trim along the first axis
])
def test_pad_or_trim_equals_whisper(shape, length, axis):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 1.0  # no zeros inside
    ours = pad_or_trim(x, length, axis=axis)
    expected = whisper_audio.pad_or_trim(x, length, axis=axis)
    assert ours.shape == expected.shape and ours.shape[axis] == length
    assert ours.dtype == x.dtype
    assert np.array_equal(ours, expected)


def test_pad_or_trim_defaults_and_values():
    x = np.arange(1, 11, dtype=np.float32)
    padded = pad_or_trim(x)
    assert padded.shape == (audio.N_SAMPLES,)
    assert np.array_equal(padded[:10], x) and not padded[10:].any()
    assert np.array_equal(pad_or_trim(x, 4), [1, 2, 3, 4])
    with pytest.raises(ValueError):
        pad_or_trim(x, -1)


# --- log_mel_spectrogram -----------------------------------------------------------------------


def _assert_close_to_whisper(ours, expected):
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    diff = np.abs(ours.astype(np.float64) - expected.astype(np.float64))
    assert diff.max() < MEL_MAX_ABS_TOL, diff.max()
    assert diff.mean() < MEL_MEAN_ABS_TOL, diff.mean()


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("padding", [0, audio.N_SAMPLES])
def test_log_mel_equals_whisper(speech_samples, n_mels, padding):
    filters = load_mel_filters(WHISPER_MEL_FILTERS, n_mels)
    expected = whisper_audio.log_mel_spectrogram(speech_samples, n_mels, padding=padding).numpy()
    ours = log_mel_spectrogram(speech_samples, filters, padding=padding)
    assert ours.shape == (n_mels, (speech_samples.size + padding) // audio.HOP_LENGTH)
    _assert_close_to_whisper(ours, expected)


def test_log_mel_30s_window_equals_whisper(speech_samples):
    window = pad_or_trim(speech_samples)
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    ours = log_mel_spectrogram(window, filters)
    assert ours.shape == (80, audio.N_FRAMES)
    _assert_close_to_whisper(ours, whisper_audio.log_mel_spectrogram(window, 80).numpy())


@pytest.mark.parametrize("length", [201, 399, 400, 401, 1234, 16000])
def test_log_mel_short_and_odd_lengths(length):
    rng = np.random.default_rng(length)
    x = (0.1 * rng.standard_normal(length)).astype(np.float32)
    x[: length // 3] = 0.0  # a stretch of digital silence too
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    _assert_close_to_whisper(log_mel_spectrogram(x, filters), whisper_audio.log_mel_spectrogram(x, 80).numpy())


def test_log_mel_float64_input_is_treated_as_float32(speech_samples):
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    clip = speech_samples[: 5 * audio.SAMPLE_RATE]
    assert np.array_equal(log_mel_spectrogram(clip.astype(np.float64), filters), log_mel_spectrogram(clip, filters))


def test_log_mel_bad_input():
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(np.zeros(200, np.float32), filters)
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram(np.zeros((2, 16000), np.float32), filters)
    with pytest.raises(ValueError, match="Mel filters"):
        log_mel_spectrogram(np.zeros(16000, np.float32), filters[:, :200])
    with pytest.raises(ValueError, match="padding"):
        log_mel_spectrogram(np.zeros(16000, np.float32), filters, padding=-1)


def test_log_mel_is_fast_for_160_seconds(speech_samples):
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 128)
    n = 160 * audio.SAMPLE_RATE
    signal = np.resize(speech_samples, n).astype(np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        mel = log_mel_spectrogram(signal, filters, padding=audio.N_SAMPLES)
        best = min(best, time.perf_counter() - start)
    assert mel.shape == (128, (n + audio.N_SAMPLES) // audio.HOP_LENGTH)
    assert best < 0.5, f"log_mel_spectrogram took {best:.3f} s for 160 s of audio"


def test_runtime_audio_does_not_import_torch_or_whisper():
    source = Path(audio.__file__).read_text()
    assert "import torch" not in source and "import whisper" not in source and "from whisper" not in source


def test_timeout_kills_ffmpeg(loader, encoded):
    path = encoded["mp3"]
    with pytest.raises(AudioError, match="did not finish") as excinfo:
        loader(path, timeout=1e-6)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_audio_from_bytes_and_file_objects_equals_path(encoded, name):
    """Bytes and file objects give the path's samples (an mp3 piped to ffmpeg would not: see load_audio)."""
    import io

    path = encoded[name]
    from_path = load_audio(path)
    data = path.read_bytes()
    with open(path, "rb") as f:
        from_file = load_audio(f)
    for samples in (load_audio(data), load_audio(bytearray(data)), load_audio(io.BytesIO(data)), from_file):
        np.testing.assert_array_equal(samples, from_path)


@pytest.mark.parametrize("source", [b"", b"\x00\x01 definitely not audio " * 64], ids=["empty", "garbage"])
def test_load_audio_bad_bytes_is_one_line(loader, source):
    import io

    for given in (source, io.BytesIO(source)):
        with pytest.raises(AudioError) as excinfo:
            loader(given)
        message = str(excinfo.value)
        assert "\n" not in message and "runtime-audio-" not in message  # names no temporary file


def test_log_mel_of_long_audio_equals_one_block_at_a_time(speech_samples):
    """Blocks of frames are made from the samples alone (no padded copy of the audio): the frames that
    straddle a block boundary and the reflected edges give what one padded signal gives."""
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    signal = np.resize(speech_samples, 160 * audio._BLOCK_FRAMES * 2 + 1234).astype(np.float32)
    padded = np.concatenate([signal, np.zeros(audio.N_SAMPLES, np.float32)])
    padded = np.pad(padded.astype(np.float64), audio.N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, audio.N_FFT)[::audio.HOP_LENGTH][:-1]
    power = np.abs(np.fft.rfft(frames * audio._hann_window(), axis=-1)) ** 2
    expected = np.log10(np.maximum(filters.astype(np.float64) @ power.T, 1e-10)).astype(np.float32)
    expected = (np.maximum(expected, expected.max() - np.float32(8.0)) + np.float32(4.0)) / np.float32(4.0)
    ours = log_mel_spectrogram(signal, filters, padding=audio.N_SAMPLES)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)


# --- streamed audio and log-Mel (long inputs) --------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_stream_audio_equals_load_audio(encoded, name):
    """stream_audio's blocks, joined, are load_audio's samples, from a path, bytes or a file object."""
    import io

    path = encoded[name]
    expected = load_audio(path)
    for block_bytes in (4096, 1 << 20):
        blocks = list(audio.stream_audio(path, block_bytes=block_bytes))
        assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
        assert len(blocks) == -(-2 * len(expected) // block_bytes)  # whole reads, then the rest
        np.testing.assert_array_equal(np.concatenate(blocks), expected)
    data = path.read_bytes()
    for source in (data, io.BytesIO(data)):
        np.testing.assert_array_equal(np.concatenate(list(audio.stream_audio(source))), expected)


def _children() -> set:
    """Process ids whose parent is this process."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry))
    return found


def test_stream_audio_stopped_early_leaves_no_ffmpeg(encoded):
    before = _children()
    blocks = audio.stream_audio(encoded["flac_44k_stereo"], block_bytes=4096)
    next(blocks)
    assert _children() - before, "ffmpeg should be running while blocks are read"
    blocks.close()
    assert _children() - before == set()


def test_log_mel_prefetch_is_the_files_log_mel(encoded, tmp_path):
    """Made on a thread of its own: the one-piece log-Mel of the file's samples, bit for bit; a file that
    cannot be decoded raises load_audio's AudioError from result(), in the caller's thread."""
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    path = encoded["flac_44k_stereo"]
    prefetch = audio.LogMelPrefetch(path, filters, audio.N_SAMPLES)
    expected = log_mel_spectrogram(audio.load_audio(path), filters, padding=audio.N_SAMPLES)
    with prefetch.result() as mel:
        assert mel.shape == expected.shape and mel[:, :].tobytes() == expected.tobytes()
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"\x00\x01 definitely not audio " * 64)
    with pytest.raises(audio.AudioError) as raised:
        audio.LogMelPrefetch(garbage, filters).result()
    with pytest.raises(audio.AudioError) as direct:
        audio.load_audio(garbage)
    assert str(raised.value) == str(direct.value)


def test_log_mel_prefetch_cancelled_stops_ffmpeg(encoded, monkeypatch):
    """cancel() stops the decoding at its next block: result() raises, no ffmpeg is left running."""
    import threading

    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    started, go_on = threading.Event(), threading.Event()
    stream = audio.stream_audio

    def held_after_the_first_block(source, **kwargs):
        blocks = stream(source, block_bytes=4096)
        try:
            yield next(blocks)
            started.set()
            go_on.wait(10)
            yield from blocks
        finally:
            blocks.close()

    before = _children()
    monkeypatch.setattr(audio, "stream_audio", held_after_the_first_block)
    prefetch = audio.LogMelPrefetch(encoded["flac_44k_stereo"], filters)
    assert started.wait(10)
    assert _children() - before, "ffmpeg should be running while the blocks are read"
    prefetch.cancel()
    go_on.set()
    with pytest.raises(audio.AudioError, match="cancelled"):
        prefetch.result()
    assert _children() - before == set()


def _chunked(samples: np.ndarray, rng) -> list:
    cuts = np.cumsum(rng.integers(1, 3 * 160 * audio._BLOCK_FRAMES, 64))
    return np.split(samples, cuts[cuts < len(samples)])


@pytest.mark.parametrize("padding", [0, audio.N_SAMPLES])
def test_spooled_log_mel_equals_log_mel_spectrogram(speech_samples, padding):
    """Computed from chunks as they come and read back a slice at a time, in memory or from its file: the
    bytes of the one-piece log_mel_spectrogram, for lengths around the block edges and chunks of any size."""
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    block = 160 * audio._BLOCK_FRAMES
    rng = np.random.default_rng(5)
    signal = np.resize(speech_samples, 2 * block + 5000).astype(np.float32)
    for n in (201, 399, 4000, block - 41, block - 40, block - 39, block, block + 1, block + 361, 2 * block + 5000):
        if n + padding <= audio.N_FFT // 2:
            continue
        samples = signal[:n]
        expected = log_mel_spectrogram(samples, filters, padding=padding)
        for memory_limit in (0, 1 << 30):
            with audio.SpooledLogMel(_chunked(samples, rng), filters, padding=padding,
                                     memory_limit=memory_limit) as mel:
                assert mel.shape == expected.shape
                assert mel.in_memory == (memory_limit > 0)
                whole = mel[:, :]
                assert whole.dtype == np.float32 and whole.flags.c_contiguous
                assert whole.tobytes() == expected.tobytes(), (n, memory_limit)
                frames = expected.shape[1]
                for start in (0, 1, frames // 2, max(frames - 3000, 0), frames - 1):
                    assert mel[:, start:start + 3000].tobytes() == expected[:, start:start + 3000].tobytes()
                assert mel[:, frames:].shape == (80, 0)


def test_log_mel_blocks_equal_one_fft_per_block(speech_samples):
    """The FFT goes a few hundred frames at a time inside a block: the values are those of one FFT of the
    block's frames at once (this module's computation before), bit for bit."""
    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    signal = np.resize(speech_samples, 160 * audio._BLOCK_FRAMES + 54321).astype(np.float32)
    n = len(signal) + audio.N_SAMPLES
    n_frames = n // audio.HOP_LENGTH
    expected = np.empty((80, n_frames), dtype=np.float32)
    for start in range(0, n_frames, audio._BLOCK_FRAMES):
        stop = min(start + audio._BLOCK_FRAMES, n_frames)
        x = audio._padded_signal(signal, n, start * audio.HOP_LENGTH, (stop - 1) * audio.HOP_LENGTH + audio.N_FFT)
        frames = np.lib.stride_tricks.as_strided(x, shape=(stop - start, audio.N_FFT),
                                                 strides=(audio.HOP_LENGTH * 4, 4), writeable=False)
        spectrum = np.fft.rfft(frames.astype(np.float64) * audio._hann_window(), axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        expected[:, start:stop] = np.log10(np.maximum(filters.astype(np.float64) @ power.T, 1e-10))
    expected = (np.maximum(expected, expected.max() - np.float32(8.0)) + np.float32(4.0)) / np.float32(4.0)
    assert log_mel_spectrogram(signal, filters, padding=audio.N_SAMPLES).tobytes() == expected.tobytes()


def test_spooled_log_mel_memory_does_not_grow_with_the_audio(speech_samples):
    """Python-side allocations (numpy's included) while 5 and 30 minutes of samples, made a second at a
    time, become a SpooledLogMel: the peak is a few blocks either way, under the 30 minutes' log-Mel alone
    (59 MB; their samples are 115 MB)."""
    import tracemalloc

    filters = load_mel_filters(WHISPER_MEL_FILTERS, 80)
    second = audio.SAMPLE_RATE

    def seconds(count):
        for i in range(count):
            start = (i * second) % (len(speech_samples) - second)
            yield speech_samples[start:start + second].astype(np.float32)  # a new array every second

    peaks = {}
    for minutes in (5, 30):
        tracemalloc.start()
        try:
            with audio.SpooledLogMel(seconds(60 * minutes), filters, padding=audio.N_SAMPLES) as mel:
                peaks[minutes] = tracemalloc.get_traced_memory()[1]
                assert not mel.in_memory
                whole_bytes = 4 * mel.shape[0] * mel.shape[1]
        finally:
            tracemalloc.stop()
    assert whole_bytes > 55e6
    assert peaks[30] < 32e6 and peaks[30] < whole_bytes / 2, peaks
    assert peaks[30] < peaks[5] + 4e6, peaks  # no growth with the length


def test_the_mel_projection_runs_on_one_blas_thread_and_gives_the_same_bits(monkeypatch):
    """numpy's BLAS runs the Mel projection on the calling thread alone (its helper threads would
    busy-wait on the cores the transcription needs next), then gets its thread count back; one
    thread or several, the log-mel has the same bits."""
    import contextlib

    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy's BLAS not found by threadpoolctl"
    seen = []
    limit = audio._one_blas_thread

    def watched():
        context = limit()
        seen.append(context)
        return context

    filters = whisper_audio.mel_filters("cpu", 80).numpy()
    samples = np.random.default_rng(0).normal(0.0, 0.1, 3 * audio.SAMPLE_RATE).astype(np.float32)
    with audio._one_blas_thread():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    monkeypatch.setattr(audio, "_one_blas_thread", watched)
    limited = log_mel_spectrogram(samples, filters)
    assert seen  # the projection went through the limit
    monkeypatch.setattr(audio, "_one_blas_thread", contextlib.nullcontext)
    np.testing.assert_array_equal(limited, log_mel_spectrogram(samples, filters))
    assert blas_threads() == before
