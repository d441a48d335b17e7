"""Continuous batching (runtime.continuous, runtime.scheduler): windows join and leave a running
batch, and each one's result is the result decode() gives for it alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime.decoding import DecodingError, DecodingOptions, decode

# prompts of different lengths (the rows' positions differ), timestamps on and off
OPTIONS = [
    DecodingOptions(language="en"),
    DecodingOptions(language="en", prompt="The weather today."),
    DecodingOptions(language="en", without_timestamps=True),
    DecodingOptions(language="en", prompt=" ".join(["a long prompt about trains and bread"] * 6)),
    DecodingOptions(language="en", prompt="Hello.", without_timestamps=True, suppress_blank=False),
]


@pytest.fixture(scope="module")
def windows(real_tiny_en_runtime, speech_72s):
    from runtime.audio import load_audio, log_mel_spectrogram, pad_or_trim

    model = real_tiny_en_runtime
    mel = log_mel_spectrogram(load_audio(str(speech_72s)), model.mel_filters)
    starts = range(0, mel.shape[1] - 200, 1000)  # overlapping windows: more of them from one file
    return [pad_or_trim(mel[:, s: s + 3000], 3000) for s in starts]


@pytest.fixture(scope="module")
def alone(real_tiny_en_runtime, windows):
    model = real_tiny_en_runtime
    return [decode(model, w, OPTIONS[i % len(OPTIONS)]) for i, w in enumerate(windows)]


def same(a, b) -> bool:
    return (a.tokens, a.text, a.sum_logprob, a.avg_logprob, a.no_speech_prob, a.compression_ratio, a.temperature,
            a.language) == (b.tokens, b.text, b.sum_logprob, b.avg_logprob, b.no_speech_prob, b.compression_ratio,
                            b.temperature, b.language)


def test_rows_that_join_a_running_batch_decode_as_alone(real_tiny_en_runtime, windows, alone):
    """One window joins per step into at most 3 rows: rows leave at their EOT and the next takes
    their place, at other positions than the rows running beside it."""
    from runtime.continuous import ContinuousDecoder

    model = real_tiny_en_runtime
    batch = ContinuousDecoder(model, max_rows=3)
    waiting, results = list(range(len(windows))), {}
    while waiting or batch.rows:
        if waiting and batch.free:
            i = waiting.pop(0)
            results.update(batch.join(model.encode(windows[i][None]), OPTIONS[i % len(OPTIONS)], None, i))
        if batch.rows:
            results.update(batch.step())
    assert sorted(results) == list(range(len(windows)))
    for i, expected in enumerate(alone):
        assert same(results[i], expected), i
    assert batch.largest == 3 and batch.row_steps > 2 * batch.steps
    assert len(batch.batch) == 0 and batch.batch.slots == 0  # idle: the pools are given back


def test_reserved_rows_are_made_at_once_and_kept_while_idle(real_tiny_en_runtime, windows, alone):
    # decode_windows reserves the rows it will use: one pool of that size, not 1, 2, 4 slots in turn
    batch = real_tiny_en_runtime.row_batch(max_rows=4)
    batch.reserve(9)
    assert batch.slots == 4 and len(batch) == 0
    pools = [id(pool) for pool in batch.cross_pool]
    features = real_tiny_en_runtime.encode(windows[0][None])
    batch.join(features, [50257, 50362], [1])
    assert [id(pool) for pool in batch.cross_pool] == pools  # joining did not grow them
    batch.leave(0)
    assert batch.slots == 4 and [id(pool) for pool in batch.cross_pool] == pools  # kept while idle


def test_decode_windows_equals_decode_alone(real_tiny_en_runtime, windows, alone):
    from runtime.continuous import decode_windows

    model = real_tiny_en_runtime
    picked = [i for i in range(len(windows)) if OPTIONS[i % len(OPTIONS)] == OPTIONS[0]]
    results = decode_windows(model, [windows[i] for i in picked], OPTIONS[0], max_rows=2)
    for i, result in zip(picked, results):
        assert same(result, alone[i]), i


def test_the_scheduler_batches_concurrent_windows_and_each_gets_its_own(real_tiny_en_runtime, windows, alone):
    """Threads decode through one scheduler, as the server's requests do: single windows, a batch
    of windows, audio features; every result as decode() gives it alone."""
    from runtime.scheduler import Scheduler

    model = real_tiny_en_runtime
    scheduler = Scheduler(model, max_batch=4)
    try:
        def one(i):
            return i, scheduler.decode(model, windows[i], OPTIONS[i % len(OPTIONS)])

        with ThreadPoolExecutor(len(windows)) as pool:
            results = dict(pool.map(one, range(len(windows))))
            pair = [i for i in range(len(windows)) if i % len(OPTIONS) == 0][:2]
            batched = scheduler.decode(model, np.stack([windows[i] for i in pair]), OPTIONS[0])
            features = scheduler.decode(model, model.encode(windows[1][None]), OPTIONS[1])
        for i, expected in enumerate(alone):
            assert same(results[i], expected), i
        assert [r.tokens for r in batched] == [alone[i].tokens for i in pair]
        assert same(features[0], alone[1])
        assert scheduler.windows == len(windows) + 3
        assert 1 < scheduler.largest_batch <= 4
        # a bad window is its caller's error; the worker goes on
        with pytest.raises(DecodingError, match="mel must have shape"):
            scheduler.decode(model, np.zeros((80, 100), np.float32), OPTIONS[0])
        assert same(scheduler.decode(model, windows[0], OPTIONS[0]), alone[0])
    finally:
        scheduler.close()


def test_a_cancelled_request_leaves_the_batch(tiny_runtime):
    """Random weights never reach EOT: a row runs its 224 steps unless its request is cancelled."""
    from runtime.scheduler import Cancelled, Scheduler

    model = tiny_runtime
    mel = np.random.default_rng(3).uniform(-1, 1.5, size=(80, 3000)).astype(np.float32)
    options = DecodingOptions(language="en", sample_len=40)
    expected = decode(model, mel, options)
    scheduler = Scheduler(model, max_batch=4)
    try:
        cancel = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            long_one = pool.submit(scheduler.decode, model, mel, DecodingOptions(language="en"), cancel=cancel)
            deadline = time.monotonic() + 120
            while scheduler.steps < 5 and time.monotonic() < deadline:  # it is a row of the batch now
                time.sleep(0.001)
            other = pool.submit(scheduler.decode, model, mel, options)
            cancel.set()
            with pytest.raises(Cancelled):
                long_one.result(timeout=120)
            assert same(other.result(timeout=120), expected)
        assert scheduler.steps < 224 + 40
    finally:
        scheduler.close()
