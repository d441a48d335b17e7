"""Audio loading and log-Mel features, matching openai-whisper's `whisper.audio` without torch.

Decoding goes through the ffmpeg binary with the very arguments openai-whisper passes it, so the
samples are identical. The log-Mel spectrogram is a vectorised numpy STFT that reproduces
`whisper.log_mel_spectrogram` (periodic Hann window, centred frames with reflect padding, the last
frame dropped, power spectrum, Mel projection, log10 with the 8-decade floor and (x + 4) / 4).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterable, Iterator, Optional

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
    with _spooled(source) as (file, name):
        return _load_audio_file(file, sr, timeout, name=name)


@contextlib.contextmanager
def _spooled(source):
    """(path, name) of a bytes or file-object source, copied to a temporary file for ffmpeg (see load_audio)."""
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
        yield spool.name, name


def _ffmpeg_command(file: str, sr: int, *, name: str) -> list:
    """openai-whisper's ffmpeg command for `file`, after the checks that give one-line errors."""
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
    return [
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


def _load_audio_file(file: str, sr: int, timeout: Optional[float], *, name: str) -> np.ndarray:
    cmd = _ffmpeg_command(file, sr, name=name)
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


STREAM_BLOCK_BYTES = 1 << 20  # what stream_audio reads from ffmpeg at a time: 32 s of 16 kHz samples


def stream_audio(source, sr: int = SAMPLE_RATE, *, timeout: Optional[float] = None,
                 block_bytes: int = STREAM_BLOCK_BYTES) -> Iterator[np.ndarray]:
    """load_audio's samples a block at a time, as ffmpeg decodes them: the blocks joined are
    `load_audio(source, sr)`, value for value, and the same AudioError (one line) where load_audio
    raises one (a decoding failure is known, and raised, once ffmpeg has finished). The whole audio
    is never in memory: a caller that consumes the blocks as they come holds one block.

    ffmpeg's stderr goes to a temporary file (only its last line is kept for the error); with
    `timeout` ffmpeg is killed when it runs past it. Leaving the iteration early kills ffmpeg."""
    if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        with _spooled(source) as (file, name):
            yield from _stream_audio_file(file, sr, timeout, block_bytes, name=name)
        return
    file = os.fspath(source)
    if not isinstance(file, str):
        file = os.fsdecode(file)
    yield from _stream_audio_file(file, sr, timeout, block_bytes, name=file)


def _widen_pipe(pipe, size: int) -> None:
    """Let ffmpeg run up to `size` bytes ahead of the reader (Linux pipes hold 64 KB by default), so
    that it decodes the next block while the last one is being used; a no-op where that is refused."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass


def _stream_audio_file(file: str, sr: int, timeout: Optional[float], block_bytes: int, *,
                       name: str) -> Iterator[np.ndarray]:
    import tempfile
    import threading

    cmd = _ffmpeg_command(file, sr, name=name)
    block_bytes = max(2, block_bytes - block_bytes % 2)
    with tempfile.TemporaryFile(prefix="runtime-ffmpeg-") as stderr:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        except FileNotFoundError as e:
            raise AudioError(f"{name}: cannot decode audio, ffmpeg is not installed (apt-get install ffmpeg)") from e
        _widen_pipe(proc.stdout, block_bytes)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        try:
            if timer is not None:
                timer.start()
            count = 0  # bytes decoded
            odd = b""  # a byte of a sample split between two reads
            while data := proc.stdout.read(block_bytes):
                count += len(data)
                if odd:
                    data = odd + data
                cut = len(data) - len(data) % 2
                odd = data[cut:]
                if cut:
                    samples = np.frombuffer(data, np.int16, count=cut // 2).astype(np.float32)
                    del data
                    samples /= np.float32(32768.0)  # load_audio's float32 quotients
                    yield samples
            returncode = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:  # the caller stopped early, or an error: no ffmpeg is left behind
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if expired.is_set() and returncode != 0:
            raise AudioError(f"{name}: ffmpeg did not finish decoding within {timeout} s")
        if returncode != 0:
            stderr.seek(0)
            raise AudioError(f"{name}: ffmpeg cannot decode the audio (exit code {returncode}): "
                             f"{_last_stderr_line(stderr.read()).replace(file, name)}")
        if count < 2:
            raise AudioError(f"{name}: decoded audio is empty (0 samples)")


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
_BLOCK_FRAMES = 4096  # frames per block of the log-Mel; the grid every computation of it shares
_FFT_ROWS = 256  # frames per FFT call inside a block


def _hann_window() -> np.ndarray:
    """Periodic Hann window of N_FFT points (torch.hann_window(N_FFT)), float64."""
    global _HANN
    if _HANN is None:
        n = np.arange(N_FFT, dtype=np.float64)
        _HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    return _HANN


def _padded_signal(audio: np.ndarray, n: int, lo: int, hi: int, offset: int = 0,
                   length: Optional[int] = None) -> np.ndarray:
    """[lo, hi) of the signal torch.stft(center=True) transforms: the audio, zeros up to n samples, and
    N_FFT // 2 samples reflected at both ends (without repeating the edge sample), float32.

    `audio` holds the samples [offset, offset + len(audio)) of an audio of `length` samples (by default
    all of it: offset 0, its own length); the stretch must lie in them or in the zeros after them."""
    half = N_FFT // 2
    if length is None:
        length = offset + audio.shape[0]
    if lo - half >= offset and hi - half <= offset + audio.shape[0]:
        return audio[lo - half - offset: hi - half - offset]  # inside the audio: the samples themselves, no copy
    j = np.arange(lo, hi, dtype=np.int64) - half  # index into audio + zeros
    j = np.where(j < 0, -j, j)
    j = np.where(j >= n, 2 * n - 2 - j, j)
    block = np.zeros(hi - lo, dtype=np.float32)
    inside = j < length
    block[inside] = audio[j[inside] - offset]
    return block


_blas_threads = None  # threadpoolctl's controller of the BLAS numpy loaded, made on first use


def _one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread alone.

    The Mel projection is numpy's only BLAS call here, and a small one (80 x 201 by a block's frames).
    On more threads OpenBLAS's helper threads busy-wait for their next job after it, on the cores the
    log-mel's FFTs, ffmpeg and then MAX's workers running the first windows need: on 2 cores about a
    quarter of a CPU second of spinning per transcription (perf, tiny.en, lecture-en.flac), for no
    speed-up of the product itself. One thread gives the same bits (each output element is one
    thread's dot product either way). The limit is process-wide while it lasts (BLAS has no
    per-thread setting); it is put back on exit, except that two threads computing log-mels at once
    (the server) can leave it at one thread: harmless, the runtime makes no other BLAS call.
    """
    global _blas_threads
    if _blas_threads is None:
        from threadpoolctl import ThreadpoolController

        _blas_threads = ThreadpoolController()
    return _blas_threads.limit(limits=1, user_api="blas")


def _log_mel_block(x: np.ndarray, n_frames: int, filters64: np.ndarray) -> np.ndarray:
    """log10 of the Mel power of `n_frames` frames (HOP_LENGTH apart) of the padded signal stretch `x`:
    float32 [n_mels, n_frames], before the clamp and scaling that need the whole spectrogram."""
    frames = np.lib.stride_tricks.as_strided(
        x, shape=(n_frames, N_FFT), strides=(HOP_LENGTH * x.strides[0], x.strides[0]), writeable=False
    )
    window = _hann_window()
    power = np.empty((n_frames, N_FREQS), dtype=np.float64)
    # The FFT transforms each frame on its own, so it goes _FFT_ROWS frames at a time (its float64
    # temporaries are then a few MB, not 40); the Mel projection takes the block's frames at once.
    for first in range(0, n_frames, _FFT_ROWS):
        # float32 samples widened to float64 here give the numbers a float64 signal would
        spectrum = np.fft.rfft(frames[first:first + _FFT_ROWS].astype(np.float64) * window, axis=-1)
        power[first:first + _FFT_ROWS] = spectrum.real**2 + spectrum.imag**2
    with _one_blas_thread():
        mel = filters64 @ power.T  # [n_mels, frames]
    del power
    np.maximum(mel, 1e-10, out=mel)
    return np.log10(mel, out=mel).astype(np.float32)


def _check_filters(filters) -> np.ndarray:
    filters = np.asarray(filters)
    if filters.ndim != 2 or filters.shape[1] != N_FREQS:
        raise ValueError(f"Mel filters must have shape [n_mels, {N_FREQS}], got {filters.shape}")
    return filters


def _too_short(n: int) -> ValueError:
    return ValueError(f"audio too short for the STFT: {n} samples (with padding), need more than {N_FFT // 2}")


def _normalize(log_spec: np.ndarray, maximum) -> np.ndarray:
    """openai-whisper's last steps, in place: clamp at the whole spectrogram's maximum - 8, then (x + 4) / 4."""
    np.maximum(log_spec, maximum - np.float32(8.0), out=log_spec)
    log_spec += np.float32(4.0)
    log_spec /= np.float32(4.0)
    return log_spec


def log_mel_spectrogram(audio: np.ndarray, filters: np.ndarray, padding: int = 0) -> np.ndarray:
    """Log-Mel spectrogram of 16 kHz mono `audio`, float32 [n_mels, n_frames].

    Same as `whisper.log_mel_spectrogram(audio, n_mels, padding)` with `filters` the [n_mels, 201]
    Mel filterbank (see load_mel_filters); `padding` zero samples are appended before the STFT.
    n_frames = (len(audio) + padding) // HOP_LENGTH.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"log_mel_spectrogram needs 1-D mono audio, got shape {audio.shape}")
    filters = _check_filters(filters)
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    # whisper feeds float32 samples to torch; round to float32 first, then compute in float64
    audio = audio.astype(np.float32, copy=False)
    n = audio.shape[0] + int(padding)
    if n <= N_FFT // 2:
        raise _too_short(n)
    n_frames = n // HOP_LENGTH  # 1 + n // HOP_LENGTH frames, minus the dropped last one
    filters64 = filters.astype(np.float64)
    log_spec = np.empty((filters.shape[0], n_frames), dtype=np.float32)
    # In blocks of frames, so hour-long audio needs neither gigabytes of float64 spectra nor a padded
    # copy of itself: each block's stretch of the padded signal is made from the samples alone.
    for start in range(0, n_frames, _BLOCK_FRAMES):
        stop = min(start + _BLOCK_FRAMES, n_frames)
        x = _padded_signal(audio, n, start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT)
        log_spec[:, start:stop] = _log_mel_block(x, stop - start, filters64)
    # the clamp needs the maximum of the whole spectrogram, so it comes after every block
    return _normalize(log_spec, log_spec.max())


def _streamed_log_mel_blocks(chunks: Iterable[np.ndarray], filters64: np.ndarray, padding: int) -> Iterator[np.ndarray]:
    """log_mel_spectrogram's blocks (log10, before the clamp), from the samples given a chunk at a time.

    The blocks are those of log_mel_spectrogram on the chunks joined: the same frames per block
    (_BLOCK_FRAMES from frame 0), each made by _padded_signal and _log_mel_block from the same
    samples, so the same numbers. A block is made as soon as every sample it reads has come; only
    the samples the next block needs are kept."""
    half = N_FFT // 2
    span = (_BLOCK_FRAMES - 1) * HOP_LENGTH + N_FFT  # padded-signal samples a whole block reads
    step = _BLOCK_FRAMES * HOP_LENGTH
    kept = np.zeros(0, dtype=np.float32)  # the samples [offset, offset + len(kept)) of the audio
    offset = 0
    start = 0  # the next block's first frame
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.ndim != 1:
            raise ValueError(f"log-Mel needs 1-D mono audio, got a block of shape {chunk.shape}")
        chunk = chunk.astype(np.float32, copy=False)
        for first in range(0, chunk.shape[0], step):  # a block's worth at a time: never a copy of a long chunk
            kept = np.concatenate([kept, chunk[first:first + step]])
            read = offset + kept.shape[0]
            # a block that reads only samples that have come (none past them, so neither the padding
            # nor the reflection at the end) is a whole block of the one-piece computation too
            while start * HOP_LENGTH + span - half <= read:
                yield _log_mel_block(_padded_signal(kept, read, start * HOP_LENGTH, start * HOP_LENGTH + span,
                                                    offset), _BLOCK_FRAMES, filters64)
                start += _BLOCK_FRAMES
                drop = start * HOP_LENGTH - half - offset  # samples before the next block's first
                if drop > 0:
                    kept, offset = kept[drop:], offset + drop
    length = offset + kept.shape[0]
    n = length + int(padding)
    if n <= half:
        raise _too_short(n)
    n_frames = n // HOP_LENGTH
    while start < n_frames:  # the rest, which the padding and the reflected end reach into
        stop = min(start + _BLOCK_FRAMES, n_frames)
        x = _padded_signal(kept, n, start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT, offset, length)
        yield _log_mel_block(x, stop - start, filters64)
        start = stop


MEL_IN_MEMORY_BYTES = 8 << 20  # SpooledLogMel keeps up to this much in memory (about 4 minutes at 80 Mel bins)


class SpooledLogMel:
    """log_mel_spectrogram(audio, filters, padding) of audio given a chunk at a time (e.g. stream_audio),
    computed as the chunks come and kept in a temporary file once it is past `memory_limit` bytes
    (default MEL_IN_MEMORY_BYTES).

    `mel[:, a:b]` (the only indexing it takes) is `log_mel_spectrogram(...)[:, a:b]`, bit for bit, and
    `shape` its shape. Neither the samples nor the whole spectrogram are ever in memory: the blocks are
    computed from the chunks as they come (_streamed_log_mel_blocks) and their log10 values stored frame
    by frame; the clamp at the whole spectrogram's maximum - 8, known once the last block is done, is
    applied to each slice read back. Memory: a block of samples and of spectrogram while it is
    computed, then the slices read. The file (4 x n_mels bytes a frame: 115 MB an hour at 80 bins) has
    no name (it is unlinked when made) and goes with `close()` or with the object."""

    def __init__(self, chunks: Iterable[np.ndarray], filters: np.ndarray, padding: int = 0, *,
                 memory_limit: Optional[int] = None):
        import tempfile
        import weakref

        if memory_limit is None:
            memory_limit = MEL_IN_MEMORY_BYTES
        filters = _check_filters(filters)
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        self.n_mels = filters.shape[0]
        self._file = None
        blocks = []  # frame-major [frames, n_mels] blocks, while they fit in memory_limit
        held = 0
        maximum = None
        n_frames = 0
        for block in _streamed_log_mel_blocks(chunks, filters.astype(np.float64), int(padding)):
            block_max = block.max()
            maximum = block_max if maximum is None else np.maximum(maximum, block_max)
            n_frames += block.shape[1]
            rows = np.ascontiguousarray(block.T)  # frame-major: a slice of frames is one read
            del block
            if self._file is None and held + rows.nbytes > memory_limit:
                self._file = tempfile.TemporaryFile(prefix="runtime-mel-")
                weakref.finalize(self, self._file.close)
                for kept in blocks:
                    self._file.write(memoryview(kept).cast("B"))
                blocks = []
            if self._file is None:
                blocks.append(rows)
                held += rows.nbytes
            else:
                self._file.write(memoryview(rows).cast("B"))
        if self._file is not None:
            self._file.flush()
        self._frames = np.concatenate(blocks) if self._file is None else None
        self.n_frames = n_frames
        self._maximum = maximum  # float32: the maximum of all the log10 values, as log_spec.max() is

    @property
    def shape(self):
        return (self.n_mels, self.n_frames)

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)):
            raise TypeError("SpooledLogMel takes mel[:, start:stop]")
        start, stop, stride = key[1].indices(self.n_frames)
        if stride != 1:
            raise TypeError("SpooledLogMel takes mel[:, start:stop] without a step")
        count = max(0, stop - start)
        if self._file is None:
            values = self._frames[start:start + count]
        else:
            row = 4 * self.n_mels
            data = os.pread(self._file.fileno(), count * row, start * row)
            values = np.frombuffer(data, dtype=np.float32).reshape(count, self.n_mels)
        out = np.empty((self.n_mels, count), dtype=np.float32)
        out[...] = values.T
        return _normalize(out, self._maximum)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._frames = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class LogMelPrefetch:
    """SpooledLogMel(stream_audio(path), filters, padding) computed on a thread of its own from now on,
    so that the caller can do other work meanwhile: the model's loading, while ffmpeg decodes the file and
    the log-mel is made (runtime.api.prefetch_log_mel). `result()` waits for it and returns the
    SpooledLogMel, or raises what computing it raised (an AudioError for audio that cannot be decoded).
    `cancel()` stops it at its next block of samples (ffmpeg is killed). The thread is a daemon: a
    process that exits first does not wait for it (ffmpeg then stops at its next write to the pipe)."""

    def __init__(self, path, filters: np.ndarray, padding: int = 0):
        import threading

        self.path = os.fspath(path)
        self.filters = _check_filters(filters)
        self.padding = int(padding)
        self._mel: Optional[SpooledLogMel] = None
        self._error: Optional[BaseException] = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._compute, name="runtime-log-mel", daemon=True).start()

    def _blocks(self) -> Iterator[np.ndarray]:
        blocks = stream_audio(self.path)
        try:
            for block in blocks:
                if self._cancelled.is_set():
                    raise AudioError(f"{self.path}: decoding cancelled")
                yield block
        finally:
            blocks.close()  # kills ffmpeg if it is still running

    def _compute(self) -> None:
        try:
            self._mel = SpooledLogMel(self._blocks(), self.filters, padding=self.padding)
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> SpooledLogMel:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._mel
