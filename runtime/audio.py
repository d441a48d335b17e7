"""Audio loading and log-Mel features, matching openai-whisper's `whisper.audio` without torch.

Decoding goes through the ffmpeg binary with the very arguments openai-whisper passes it, so the
samples are identical. The log-Mel spectrogram is a vectorised numpy STFT that reproduces
`whisper.log_mel_spectrogram` (periodic Hann window, centred frames with reflect padding, the last
frame dropped, power spectrum, Mel projection, log10 with the 8-decade floor and (x + 4) / 4).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

import numpy as np

# hard-coded audio hyperparameters, as in openai-whisper
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a mel spectrogram input

N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the initial convolutions have stride 2
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 10 ms per audio frame
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 20 ms per audio token

N_FREQS = 1 + N_FFT // 2


class AudioError(ValueError):
    """An audio (or Mel filter) file that cannot be used; the message is one line naming the file."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _last_stderr_line(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return _one_line(lines[-1]) if lines else "no error message"


def load_audio(source, sr: int = SAMPLE_RATE, *, timeout: Optional[float] = None) -> np.ndarray:
    """Decode `source` to float32 mono samples in [-1, 1) at `sr` Hz, down-mixing and resampling.

    `source` is a file path, or the encoded file itself: bytes, or a binary file object (read from
    where it stands to its end). Runs `ffmpeg` with the same arguments as `whisper.audio.load_audio`,
    so the samples are equal to openai-whisper's. Raises AudioError (one line) when the file is
    missing or empty, ffmpeg is not installed, ffmpeg cannot decode it, or the decoded audio has no
    samples. `timeout` (seconds, default none) bounds the ffmpeg run; the process is killed when it
    runs out.

    Bytes and file objects are copied to a temporary file first rather than piped to ffmpeg's
    stdin: from a pipe ffmpeg cannot seek, so an mp3 keeps its encoder padding (237 more samples on
    a 1.7 s espeak clip, measured) and an mp4 whose index sits at its end does not decode at all;
    from a file the samples are those of the same file given by path.
    """
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return _load_audio_object(source, sr, timeout)
    file = os.fspath(source)
    if not isinstance(file, str):
        file = os.fsdecode(file)
    return _load_audio_file(file, sr, timeout, name=file)


def _load_audio_object(source, sr: int, timeout: Optional[float]) -> np.ndarray:
    import tempfile

    name = "audio bytes" if isinstance(source, (bytes, bytearray, memoryview)) else \
        str(getattr(source, "name", None) or "audio stream")
    with tempfile.NamedTemporaryFile(prefix="runtime-audio-", suffix=".bin") as spool:
        if isinstance(source, (bytes, bytearray, memoryview)):
            spool.write(source)
        else:
            while block := source.read(1 << 20):  # in blocks: an upload need not fit in memory twice
                if not isinstance(block, (bytes, bytearray, memoryview)):
                    raise AudioError(f"{name}: not a binary stream (open it with 'rb')")
                spool.write(block)
        spool.flush()
        return _load_audio_file(spool.name, sr, timeout, name=name)


def _load_audio_file(file: str, sr: int, timeout: Optional[float], *, name: str) -> np.ndarray:
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {sr!r}")
    if not os.path.exists(file):
        raise AudioError(f"{name}: audio file not found")
    if os.path.isdir(file):
        raise AudioError(f"{name}: is a directory, not an audio file")
    if not os.path.isfile(file):
        # a FIFO or device could block ffmpeg forever
        raise AudioError(f"{name}: not a regular file (a pipe or device cannot be decoded)")
    if os.path.getsize(file) == 0:
        raise AudioError(f"{name}: file is empty (0 bytes), no audio to decode")

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"{name}: cannot decode audio, ffmpeg is not installed (apt-get install ffmpeg)")
    # fmt: off
    cmd = [
        ffmpeg,
        "-nostdin",
        "-threads", "0",
        "-i", file,
        "-f", "s16le",
        "-ac", "1",
        "-acodec", "pcm_s16le",
        "-ar", str(int(sr)),
        "-",
    ]
    # fmt: on
    try:
        # subprocess.run kills the child if we are interrupted or time out, so none is left behind
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except FileNotFoundError as e:
        raise AudioError(f"{name}: cannot decode audio, ffmpeg is not installed (apt-get install ffmpeg)") from e
    except subprocess.TimeoutExpired as e:
        raise AudioError(f"{name}: ffmpeg did not finish decoding within {timeout} s") from e
    if proc.returncode != 0:
        raise AudioError(
            f"{name}: ffmpeg cannot decode the audio (exit code {proc.returncode}): "
            f"{_last_stderr_line(proc.stderr).replace(file, name)}"
        )
    out = proc.stdout
    if len(out) < 2:
        raise AudioError(f"{name}: decoded audio is empty (0 samples)")
    out = out[: len(out) - len(out) % 2]
    samples = np.frombuffer(out, np.int16).astype(np.float32)
    del out, proc  # the int16 bytes are not needed any more
    samples /= np.float32(32768.0)  # in place: the same float32 quotients as `/ 32768.0`, without a second copy
    return samples


def load_mel_filters(path, n_mels: int) -> np.ndarray:
    """The Mel filterbank `mel_{n_mels}` from an npz laid out like whisper/assets/mel_filters.npz.

    Returns float32 [n_mels, 1 + N_FFT // 2]; raises AudioError when the file or key is missing or
    the matrix has the wrong shape.
    """
    file = os.fspath(path)
    key = f"mel_{n_mels}"
    if not os.path.isfile(file):
        raise AudioError(f"{file}: Mel filter file not found")
    try:
        with np.load(file, allow_pickle=False) as f:
            if key not in f.files:
                raise AudioError(f"{file}: no Mel filters for n_mels={n_mels} (key {key!r}; has {', '.join(f.files)})")
            filters = np.asarray(f[key])
    except AudioError:
        raise
    except Exception as e:  # zipfile / format errors
        raise AudioError(f"{file}: not a readable Mel filter npz ({type(e).__name__}: {_one_line(str(e))})") from e
    if filters.shape != (n_mels, N_FREQS):
        raise AudioError(f"{file}: {key} has shape {filters.shape}, expected ({n_mels}, {N_FREQS})")
    return filters.astype(np.float32, copy=False)


def pad_or_trim(array: np.ndarray, length: int = N_SAMPLES, *, axis: int = -1) -> np.ndarray:
    """Zero-pad or trim `array` along `axis` to exactly `length` entries, as whisper.pad_or_trim."""
    array = np.asarray(array)
    if length < 0:
        raise ValueError(f"pad_or_trim length must be non-negative, got {length}")
    if array.ndim == 0:
        raise ValueError("pad_or_trim needs an array with at least one dimension")
    size = array.shape[axis]
    if size > length:
        array = np.take(array, np.arange(length), axis=axis)
    if size < length:
        pad_widths = [(0, 0)] * array.ndim
        pad_widths[axis] = (0, length - size)
        array = np.pad(array, pad_widths)
    return array


_HANN = None
_BLOCK_FRAMES = 4096


def _hann_window() -> np.ndarray:
    """Periodic Hann window of N_FFT points (torch.hann_window(N_FFT)), float64."""
    global _HANN
    if _HANN is None:
        n = np.arange(N_FFT, dtype=np.float64)
        _HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    return _HANN


def _padded_signal(audio: np.ndarray, n: int, lo: int, hi: int) -> np.ndarray:
    """[lo, hi) of the signal torch.stft(center=True) transforms: the audio, zeros up to n samples, and
    N_FFT // 2 samples reflected at both ends (without repeating the edge sample), float32."""
    half = N_FFT // 2
    if lo - half >= 0 and hi - half <= audio.shape[0]:
        return audio[lo - half: hi - half]  # inside the audio: the samples themselves, no copy
    j = np.arange(lo, hi, dtype=np.int64) - half  # index into audio + zeros
    j = np.where(j < 0, -j, j)
    j = np.where(j >= n, 2 * n - 2 - j, j)
    block = np.zeros(hi - lo, dtype=np.float32)
    inside = j < audio.shape[0]
    block[inside] = audio[j[inside]]
    return block


def log_mel_spectrogram(audio: np.ndarray, filters: np.ndarray, padding: int = 0) -> np.ndarray:
    """Log-Mel spectrogram of 16 kHz mono `audio`, float32 [n_mels, n_frames].

    Same as `whisper.log_mel_spectrogram(audio, n_mels, padding)` with `filters` the [n_mels, 201]
    Mel filterbank (see load_mel_filters); `padding` zero samples are appended before the STFT.
    n_frames = (len(audio) + padding) // HOP_LENGTH.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"log_mel_spectrogram needs 1-D mono audio, got shape {audio.shape}")
    filters = np.asarray(filters)
    if filters.ndim != 2 or filters.shape[1] != N_FREQS:
        raise ValueError(f"Mel filters must have shape [n_mels, {N_FREQS}], got {filters.shape}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    # whisper feeds float32 samples to torch; round to float32 first, then compute in float64
    audio = audio.astype(np.float32, copy=False)
    n = audio.shape[0] + int(padding)
    half = N_FFT // 2
    if n <= half:
        raise ValueError(f"audio too short for the STFT: {n} samples (with padding), need more than {half}")
    n_frames = n // HOP_LENGTH  # 1 + n // HOP_LENGTH frames, minus the dropped last one
    window = _hann_window()
    filters64 = filters.astype(np.float64)
    log_spec = np.empty((filters.shape[0], n_frames), dtype=np.float32)
    # In blocks of frames, so hour-long audio needs neither gigabytes of float64 spectra nor a padded
    # copy of itself: each block's stretch of the padded signal is made from the samples alone.
    for start in range(0, n_frames, _BLOCK_FRAMES):
        stop = min(start + _BLOCK_FRAMES, n_frames)
        x = _padded_signal(audio, n, start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT)
        frames = np.lib.stride_tricks.as_strided(
            x, shape=(stop - start, N_FFT), strides=(HOP_LENGTH * x.strides[0], x.strides[0]), writeable=False
        )
        # float32 samples widened to float64 here give the numbers a float64 signal would
        spectrum = np.fft.rfft(frames.astype(np.float64) * window, axis=-1)  # [frames, N_FREQS]
        power = spectrum.real**2 + spectrum.imag**2
        mel = filters64 @ power.T  # [n_mels, frames]
        log_spec[:, start:stop] = np.log10(np.maximum(mel, 1e-10))
    # the clamp needs the maximum of the whole spectrogram, so it comes after every block
    if log_spec.size:
        np.maximum(log_spec, log_spec.max() - np.float32(8.0), out=log_spec)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec
