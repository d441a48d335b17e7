"""runtime.host_arrays: the decoder sessions' large host arrays, reused once nothing holds them."""

from __future__ import annotations

import numpy as np

from runtime.host_arrays import HostArrayPool


def test_an_array_is_handed_out_again_only_once_nothing_holds_it():
    from max import driver

    pool = HostArrayPool()
    first = pool.take((4, 8), np.float32)
    first[:] = 7
    view = first[1:]
    del first
    second = pool.take((4, 8), np.float32)  # a view of the first is alive
    assert not np.shares_memory(second, view)
    del view
    third = pool.take((4, 8), np.float32)
    assert third.base is not None and (third == 7).all()  # the first's memory, as it was left
    buffer = driver.Buffer.from_numpy(third)  # MAX reads and writes the array's own memory
    del third
    assert not np.shares_memory(pool.take((4, 8), np.float32), second)
    assert not np.shares_memory(pool.take((4, 8)), buffer.to_numpy())
    kept = pool.kept_bytes
    del buffer
    reused = pool.take((4, 8))
    assert pool.kept_bytes == kept  # no new buffer: the one MAX held is free again
    assert reused.dtype == np.float32 and reused.shape == (4, 8) and reused.flags.c_contiguous


def test_zeros_come_zeroed_from_a_used_buffer():
    pool = HostArrayPool()
    used = pool.take((1000,), np.float32)
    used[:] = np.nan
    del used
    again = pool.take((10, 100), np.float32, zeros=True)
    assert np.array_equal(again, np.zeros((10, 100), np.float32))


def test_a_buffer_far_larger_than_asked_is_not_used_and_outgrown_ones_are_let_go():
    pool = HostArrayPool(slack=2.0)
    large = pool.take((1 << 20,), np.uint8)
    del large
    small = pool.take((1 << 10,), np.uint8)  # a free 1 MB buffer for 1 KB: a new one
    assert pool.kept_bytes == (1 << 20) + (1 << 10)
    del small
    larger = pool.take((1 << 21,), np.uint8)  # the free ones are both smaller: let go, not kept beside it
    assert pool.kept_bytes == 1 << 21
    held = pool.take((1 << 19,), np.uint8)
    del larger
    pool.drop_free()
    assert pool.kept_bytes == held.nbytes  # only what is in use


def test_batched_sessions_reuse_the_last_ones_memory_with_the_same_results(tiny_runtime):
    """A prefill of several audios' rows (one graph call a row, copied into arrays of all the rows) fills
    the memory the previous session's prefill left, and gives what fresh memory gives: every value the
    previous session left there is overwritten."""
    rng = np.random.default_rng(0)
    mels = [rng.standard_normal((2, tiny_runtime.dims.n_mels, 3000), dtype=np.float32) * 0.5 for _ in range(2)]
    tokens = np.array([[50257, 220, 220, 220], [50257, 11, 220, 12]], dtype=np.int64)

    def decode(mel):
        session = tiny_runtime.decoder(tiny_runtime.encode(mel))
        first = session.prefill(tokens, [3]).copy()
        steps = [session.step(np.array([[11 + i], [13 + i]])).copy() for i in range(3)]
        addresses = [session.model._to_host(b).__array_interface__["data"][0] for b in session.cross]
        return session, first, steps, addresses

    session, first_a, steps_a, addresses_a = decode(mels[0])
    del session
    session, first_b, steps_b, addresses_b = decode(mels[1])
    assert addresses_b == addresses_a  # the first session's memory, reused
    del session
    pool, tiny_runtime._host_arrays = tiny_runtime._host_arrays, HostArrayPool()
    try:
        session, first_fresh, steps_fresh, addresses_fresh = decode(mels[1])  # fresh memory
        assert addresses_fresh != addresses_a
        del session
    finally:
        tiny_runtime._host_arrays = pool
    assert np.array_equal(first_b, first_fresh)
    assert all(np.array_equal(got, fresh) for got, fresh in zip(steps_b, steps_fresh))
    assert not np.array_equal(first_a, first_b)
