"""The custom Mojo kernels against numpy float64, in a graph of their own.

The decoder graphs use them too (tests/test_graph_parity.py checks those against torch); this checks
the shapes the decoder does not happen to hit: position counts on and off the 16-lane vector width,
one position, many rows, rows split unevenly over threads.
"""

from __future__ import annotations

import numpy as np
import pytest

HEADS, HEAD_DIM = 6, 64
TOLERANCE = 1e-5  # fp32 sums of at most 2048 terms; observed about 4e-7
LOGITS_VOCAB = 200  # int8_logits' test vocabulary: three whole column tiles of 64 and part of a fourth


@pytest.fixture(scope="module")
def kernel_graphs():
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    from max.graph import BufferType

    from graph_builders.graphs import RESCORE_MARGIN
    from graph_builders.kernels import (KERNELS_PATH, cached_query_attention, dynamic_int8_matmul,
                                        fp16_weight_matmul, grouped_query_attention, int8_logits,
                                        int8_weight_matmul, quantize_rows, single_query_attention)

    session = InferenceSession(devices=[CPU()])
    cpu = DeviceRef.CPU()
    attention_inputs = [TensorType(DType.float32, ["rows", HEAD_DIM], cpu),
                        TensorType(DType.float32, ["rows", HEAD_DIM, "positions"], cpu),
                        TensorType(DType.float32, ["rows", "positions", HEAD_DIM], cpu)]
    with Graph("attention_kernel", input_types=attention_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        graph.output(single_query_attention(*(v.tensor for v in graph.inputs)))
    attention = session.load(graph)
    matmul_inputs = [TensorType(DType.float32, ["m", "k"], cpu), TensorType(DType.float16, ["k", "n"], cpu)]
    with Graph("matmul_kernel", input_types=matmul_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        x, w = (v.tensor for v in graph.inputs)
        graph.output(fp16_weight_matmul(x, w), x @ ops.cast(w, DType.float32))
    matmul = session.load(graph)
    grouped_inputs = [TensorType(DType.float32, ["rows", HEADS, HEAD_DIM], cpu),
                      TensorType(DType.float32, ["groups", HEADS, HEAD_DIM, "positions"], cpu),
                      TensorType(DType.float32, ["groups", HEADS, "positions", HEAD_DIM], cpu),
                      TensorType(DType.int64, ["rows"], cpu)]
    with Graph("grouped_attention_kernel", input_types=grouped_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        graph.output(grouped_query_attention(*(v.tensor for v in graph.inputs)))
    grouped = session.load(graph)
    cached_inputs = [BufferType(DType.float32, ["rows", HEADS, HEAD_DIM, "capacity"], cpu),
                     BufferType(DType.float32, ["rows", HEADS, "capacity", HEAD_DIM], cpu),
                     *[TensorType(DType.float32, ["rows", HEADS, HEAD_DIM], cpu)] * 3,
                     *[TensorType(DType.int64, ["rows"], cpu)] * 3]
    with Graph("cached_attention_kernel", input_types=cached_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        k_cache, v_cache = (v.buffer for v in graph.inputs[:2])
        graph.output(cached_query_attention(k_cache, v_cache, *(v.tensor for v in graph.inputs[2:])))
    cached = session.load(graph)
    int8_inputs = [TensorType(DType.float32, ["m", "k"], cpu), TensorType(DType.int8, ["k", "n"], cpu),
                   TensorType(DType.float32, ["groups", "n"], cpu)]
    with Graph("int8_matmul_kernel", input_types=int8_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        graph.output(int8_weight_matmul(*(v.tensor for v in graph.inputs)))
    int8_matmul = session.load(graph)
    grouped16_inputs = [TensorType(DType.float32, ["rows", HEADS, HEAD_DIM], cpu),
                        TensorType(DType.float16, ["groups", HEADS, HEAD_DIM, "positions"], cpu),
                        TensorType(DType.float16, ["groups", HEADS, "positions", HEAD_DIM], cpu),
                        TensorType(DType.int64, ["rows"], cpu)]
    with Graph("grouped_attention_f16kv_kernel", input_types=grouped16_inputs,
               custom_extensions=[KERNELS_PATH]) as graph:
        graph.output(grouped_query_attention(*(v.tensor for v in graph.inputs)))
    grouped16 = session.load(graph)
    dynamic_inputs = [TensorType(DType.float32, ["m", "k"], cpu), TensorType(DType.int8, ["tiles", "packed"], cpu),
                      TensorType(DType.float32, ["n"], cpu), TensorType(DType.float32, ["n"], cpu)]
    with Graph("dynamic_int8_kernel", input_types=dynamic_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        x, w, w_scale, bias = (v.tensor for v in graph.inputs)
        q, q_scale = quantize_rows(x, 64)
        graph.output(q, q_scale, dynamic_int8_matmul(q, q_scale, w, w_scale, bias),
                     dynamic_int8_matmul(q, q_scale, w, w_scale, bias, portable=True))
    dynamic = session.load(graph)
    logits_inputs = [TensorType(DType.float32, ["m", "k"], cpu), TensorType(DType.int8, ["tiles", "packed"], cpu),
                     TensorType(DType.float32, ["n"], cpu), TensorType(DType.float16, [LOGITS_VOCAB, "k"], cpu)]
    with Graph("int8_logits_kernel", input_types=logits_inputs, custom_extensions=[KERNELS_PATH]) as graph:
        hidden, w, w_scale, embedding = (v.tensor for v in graph.inputs)
        q, q_scale = quantize_rows(hidden, 64)
        graph.output(q, q_scale, int8_logits(hidden, q, q_scale, w, w_scale, embedding, RESCORE_MARGIN),
                     int8_logits(hidden, q, q_scale, w, w_scale, embedding, RESCORE_MARGIN, portable=True))
    logits = session.load(graph)
    return attention, matmul, grouped, cached, int8_matmul, grouped16, dynamic, logits


def _grouped_inputs(kv_rows, positions, kv_dtype, seed):
    """q [rows, H, 64] fp32, k_t [audios, H, 64, positions] and v [audios, H, positions, 64] of kv_dtype, kv_rows."""
    rng = np.random.default_rng(seed)
    rows, groups = len(kv_rows), max(kv_rows) + 1
    q = rng.standard_normal((rows, HEADS, HEAD_DIM)).astype(np.float32)
    k_t = rng.standard_normal((groups, HEADS, HEAD_DIM, positions)).astype(kv_dtype)
    v = rng.standard_normal((groups, HEADS, positions, HEAD_DIM)).astype(kv_dtype)
    return q, k_t, v, np.asarray(kv_rows, dtype=np.int64)


def _reference_attention(q, k_t, v):
    q, k_t, v = (a.astype(np.float64) for a in (q, k_t, v))
    scores = np.einsum("rd,rdm->rm", q, k_t) / np.sqrt(HEAD_DIM)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("rm,rmd->rd", p, v)


@pytest.mark.parametrize("rows,positions", [(6, 1), (6, 5), (6, 16), (7, 37), (36, 224), (6, 1500), (13, 2048)])
def test_single_query_attention_matches_numpy(kernel_graphs, rows, positions):
    from max.driver import Buffer

    rng = np.random.default_rng(positions)
    q = rng.standard_normal((rows, HEAD_DIM)).astype(np.float32)
    k_t = rng.standard_normal((rows, HEAD_DIM, positions)).astype(np.float32)
    v = rng.standard_normal((rows, positions, HEAD_DIM)).astype(np.float32)
    (out,) = kernel_graphs[0].execute(*(Buffer.from_numpy(a) for a in (q, k_t, v)))
    ours = out.to_numpy()
    assert ours.shape == (rows, HEAD_DIM)
    assert np.abs(ours - _reference_attention(q, k_t, v)).max() < TOLERANCE


def test_single_query_attention_refuses_too_many_positions(kernel_graphs):
    from max.driver import Buffer

    rows, positions = 2, 2049
    arrays = (np.zeros((rows, HEAD_DIM), np.float32), np.zeros((rows, HEAD_DIM, positions), np.float32),
              np.zeros((rows, positions, HEAD_DIM), np.float32))
    with pytest.raises(Exception, match="too many positions"):
        kernel_graphs[0].execute(*(Buffer.from_numpy(a) for a in arrays))


@pytest.mark.parametrize("kv_rows,positions", [
    ([0, 0, 0, 0, 0], 1500),  # five beams of one audio
    ([1, 0, 1, 0, 2], 37),  # rows of three audios, interleaved, after a reorder across audios
    ([0] * 9 + [1] * 4, 17),  # more rows of one audio than one pass takes
    ([2, 2], 1),  # an audio no row uses
])
def test_grouped_query_attention_equals_single_query_attention(kernel_graphs, kv_rows, positions):
    """Rows that share keys and values read them once, and each row's result is bit for bit what
    single_query_attention gives on its own copy of them."""
    from max.driver import Buffer

    q, k_t, v, index = _grouped_inputs(kv_rows, positions, np.float32, seed=len(kv_rows) * positions)
    rows = len(kv_rows)
    (out,) = kernel_graphs[2].execute(*(Buffer.from_numpy(a) for a in (q, k_t, v, index)))
    ours = out.to_numpy()
    assert ours.shape == (rows, HEADS, HEAD_DIM)
    single = (q.reshape(-1, HEAD_DIM), k_t[index].reshape(-1, HEAD_DIM, positions),
              v[index].reshape(-1, positions, HEAD_DIM))
    (alone,) = kernel_graphs[0].execute(*(Buffer.from_numpy(np.ascontiguousarray(a)) for a in single))
    np.testing.assert_array_equal(ours.reshape(-1, HEAD_DIM), alone.to_numpy())
    assert np.abs(ours.reshape(-1, HEAD_DIM) - _reference_attention(*single)).max() < TOLERANCE


@pytest.mark.parametrize("kv_rows,positions", [([0], 1500), ([0, 0, 0, 0, 0], 1500), ([1, 0, 1], 37)])
def test_grouped_query_attention_reads_fp16_keys_and_values_as_their_fp32_widening(kernel_graphs, kv_rows,
                                                                                   positions):
    """The int8 build's fp16 cross-attention keys and values: the same bits as the fp32 kernel on
    the same values widened (fp16 -> fp32 is exact)."""
    from max.driver import Buffer

    q, k_t, v, index = _grouped_inputs(kv_rows, positions, np.float16, seed=positions + len(kv_rows))
    (half,) = kernel_graphs[5].execute(*(Buffer.from_numpy(a) for a in (q, k_t, v, index)))
    widened = (q, k_t.astype(np.float32), v.astype(np.float32), index)
    (full,) = kernel_graphs[2].execute(*(Buffer.from_numpy(a) for a in widened))
    np.testing.assert_array_equal(half.to_numpy(), full.to_numpy())


def test_grouped_query_attention_refuses_a_row_outside_the_audio(kernel_graphs):
    from max.driver import Buffer

    arrays = (np.zeros((2, HEADS, HEAD_DIM), np.float32), np.zeros((1, HEADS, HEAD_DIM, 4), np.float32),
              np.zeros((1, HEADS, 4, HEAD_DIM), np.float32), np.array([0, 1], np.int64))
    with pytest.raises(Exception, match="out of range"):
        kernel_graphs[2].execute(*(Buffer.from_numpy(a) for a in arrays))


@pytest.fixture(scope="module")
def full_attention_graph():
    """The fp32 op and the bf16 one (the int8 build's encoder) on the same inputs: outputs (fp32, bf16)."""
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    from graph_builders.kernels import KERNELS_PATH, full_attention

    rows = TensorType(DType.float32, ["batch", "rows", HEADS * HEAD_DIM], DeviceRef.CPU())
    with Graph("full_attention_kernel", input_types=[rows] * 3, custom_extensions=[KERNELS_PATH]) as graph:
        q, k, v = (v.tensor for v in graph.inputs)
        graph.output(full_attention(q, k, v), full_attention(q, k, v, bf16=True))
    return InferenceSession(devices=[CPU()]).load(graph)


def _reference_full_attention(q, k, v):
    """softmax(q_h k_h^T / 8) v_h per head in float64, the heads side by side as the kernel takes them."""
    batch, rows, _ = q.shape
    q, k, v = (a.astype(np.float64).reshape(batch, rows, HEADS, HEAD_DIM).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(batch, rows, HEADS * HEAD_DIM)


# rows on and off the kernel's register tile (6), query block (48), vector (16) and key tile (64) sizes;
# 1500 is the encoder's
@pytest.mark.parametrize("batch,rows", [(1, 1), (2, 37), (1, 100), (3, 64), (1, 1500)])
def test_full_attention_matches_numpy(full_attention_graph, batch, rows):
    from max.driver import Buffer

    rng = np.random.default_rng(rows)
    q, k, v = (rng.standard_normal((batch, rows, HEADS * HEAD_DIM)).astype(np.float32) for _ in range(3))
    out, _ = full_attention_graph.execute(*(Buffer.from_numpy(a) for a in (q, k, v)))
    assert np.abs(out.to_numpy() - _reference_full_attention(q, k, v)).max() < TOLERANCE


def test_full_attention_softmax_is_over_the_real_keys_only(full_attention_graph):
    """Every score far below zero: a padding key (the kernel's key tiles are 64 wide, its scores 0)
    counted as a row's largest would underflow every exp() to 0 and the row to NaN."""
    from max.driver import Buffer

    rng = np.random.default_rng(1)
    rows = 37
    q = np.abs(rng.standard_normal((1, rows, HEADS * HEAD_DIM))).astype(np.float32) * 8
    k = -np.abs(rng.standard_normal((1, rows, HEADS * HEAD_DIM))).astype(np.float32) * 8  # scores -500..-200
    v = rng.standard_normal((1, rows, HEADS * HEAD_DIM)).astype(np.float32)
    reference = _reference_full_attention(q, k, v)
    out, _ = full_attention_graph.execute(*(Buffer.from_numpy(a) for a in (q, k, v)))
    assert np.isfinite(out.to_numpy()).all()
    # scores this large carry fp32 rounding of ~3e-5 each (6e-5 observed in the output)
    assert np.abs(out.to_numpy() - reference).max() < 1e-3


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:
        return False


# rows on and off the tiles' 16 rows, the packed key blocks (16, passes of 64) and value blocks (32)
@pytest.mark.parametrize("batch,rows", [(1, 1), (2, 37), (1, 100), (3, 64), (1, 1500)])
def test_full_attention_bf16_is_the_attention_to_bf16_rounding(full_attention_graph, batch, rows):
    """With AMX (bf16 tiles): within bf16 rounding of float64 (inputs and weights rounded to 8 bits of
    mantissa, sums fp32), and not the fp32 op's bits; without AMX: the fp32 op's computation, bit for bit."""
    from max.driver import Buffer

    rng = np.random.default_rng(rows)
    q, k, v = (rng.standard_normal((batch, rows, HEADS * HEAD_DIM)).astype(np.float32) for _ in range(3))
    fp32, bf16 = (o.to_numpy() for o in full_attention_graph.execute(*(Buffer.from_numpy(a) for a in (q, k, v))))
    reference = _reference_full_attention(q, k, v)
    error = np.abs(bf16 - reference)
    if _cpu_has_amx():
        assert not np.array_equal(bf16, fp32)
        assert error.max() < 0.02 and error.mean() < 2e-3
    else:
        np.testing.assert_array_equal(bf16, fp32)
    # every query row, key and value of every head counts: one row's keys left out or misplaced moves
    # its batch entry's outputs far past that
    k[-1, rows // 2] += 3
    moved = full_attention_graph.execute(*(Buffer.from_numpy(a) for a in (q, k, v)))[1].to_numpy()
    assert np.abs(moved - _reference_full_attention(q, k, v)).max() < 0.02
    assert np.abs(moved[-1] - bf16[-1]).max() > 0.05 or rows == 1


@pytest.mark.parametrize("capacity,filled", [
    (448, [0] * 5), (448, [299] * 5), (20, [19, 19]), (64, [33, 0, 5, 63, 17, 1, 40]), (448, [447, 0, 222])])
def test_cached_query_attention_extends_the_cache_in_place(kernel_graphs, capacity, filled):
    """Each row writes its key and value at its own position into the caller's buffers, leaves every
    other position as it was, and gets bit for bit single_query_attention over its positions up to it."""
    from max.driver import Buffer

    rows = len(filled)
    rng = np.random.default_rng(capacity + sum(filled))
    k_cache = rng.standard_normal((rows, HEADS, HEAD_DIM, capacity)).astype(np.float32)
    v_cache = rng.standard_normal((rows, HEADS, capacity, HEAD_DIM)).astype(np.float32)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    q, k, v = (rng.standard_normal((rows, HEADS, HEAD_DIM)).astype(np.float32) for _ in range(3))
    own = (np.arange(rows, dtype=np.int64), np.zeros(rows, np.int64))  # every row reads its own positions
    (out,) = kernel_graphs[3].execute(Buffer.from_numpy(k_cache), Buffer.from_numpy(v_cache),
                                      *(Buffer.from_numpy(a) for a in (q, k, v, np.array(filled, np.int64), *own)))
    expected_k, expected_v = k_before.copy(), v_before.copy()
    for row, at in enumerate(filled):
        expected_k[row, ..., at], expected_v[row, :, at] = k[row], v[row]
    np.testing.assert_array_equal(k_cache, expected_k)
    np.testing.assert_array_equal(v_cache, expected_v)
    for row, at in enumerate(filled):
        n = at + 1
        single = (q[row], np.ascontiguousarray(expected_k[row, ..., :n]), np.ascontiguousarray(expected_v[row, :, :n]))
        (alone,) = kernel_graphs[0].execute(*(Buffer.from_numpy(a) for a in single))
        np.testing.assert_array_equal(out.to_numpy()[row], alone.to_numpy(), err_msg=f"row {row}")


@pytest.mark.parametrize("positions", [[4], [0, 4], [-1]])
def test_cached_query_attention_refuses_a_position_past_the_cache(kernel_graphs, positions):
    from max.driver import Buffer

    rows = len(positions)
    arrays = (np.zeros((rows, HEADS, HEAD_DIM, 4), np.float32), np.zeros((rows, HEADS, 4, HEAD_DIM), np.float32),
              *[np.zeros((rows, HEADS, HEAD_DIM), np.float32)] * 3, np.array(positions, np.int64),
              np.arange(rows, dtype=np.int64), np.zeros(rows, np.int64))
    with pytest.raises(Exception, match="position outside the cache"):
        kernel_graphs[3].execute(*(Buffer.from_numpy(a) for a in arrays))


@pytest.mark.parametrize("capacity,filled,prefix_rows,shared", [
    (448, [260] * 5, [0] * 5, 250),  # five beams of one audio that parted 10 positions ago
    (448, [300] * 10 + [299], [0] * 4 + [4] * 7, 47),  # two audios; a group past one pass (6 rows); a shorter row
    (64, [33, 33, 20], [1, 1, 1], 16),  # the prefix row is not the first row
    (64, [9, 9], [0, 0], 9),  # fewer positions than a vector, all of them shared
    (448, [447, 447, 3], [0, 0, 2], 447),  # every position but the new one
])
def test_cached_query_attention_reads_a_shared_prefix_once(kernel_graphs, capacity, filled, prefix_rows, shared):
    """Rows that name a prefix row read their shared positions from its cache, once for all of them:
    the same bits as each row reading its own copy, and the caches written as without sharing."""
    from max.driver import Buffer

    rows = len(filled)
    rng = np.random.default_rng(capacity + rows)
    k_cache = rng.standard_normal((rows, HEADS, HEAD_DIM, capacity)).astype(np.float32)
    v_cache = rng.standard_normal((rows, HEADS, capacity, HEAD_DIM)).astype(np.float32)
    lengths = np.array([min(shared, filled[row], filled[lead]) for row, lead in enumerate(prefix_rows)], np.int64)
    for row, lead in enumerate(prefix_rows):  # the promise: the shared positions hold the same values
        k_cache[row, ..., :lengths[row]] = k_cache[lead, ..., :lengths[row]]
        v_cache[row, :, :lengths[row]] = v_cache[lead, :, :lengths[row]]
    # the shared positions are read from the prefix row's cache, in whole vectors of 16 positions up to
    # the group's shortest: a row's own copy of those is never read (poisoned to show so)
    poisoned_k, poisoned_v = k_cache.copy(), v_cache.copy()
    for row, lead in enumerate(prefix_rows):
        unread = min(lengths[np.array(prefix_rows) == lead]) // 16 * 16
        if lead != row:
            poisoned_k[row, ..., :unread] = np.nan
            poisoned_v[row, :, :unread] = np.nan
    q, k, v = (rng.standard_normal((rows, HEADS, HEAD_DIM)).astype(np.float32) for _ in range(3))
    position = np.array(filled, np.int64)

    def attend(k_start, v_start, prefix):
        caches = Buffer.from_numpy(k_start.copy()), Buffer.from_numpy(v_start.copy())
        (out,) = kernel_graphs[3].execute(*caches, *(Buffer.from_numpy(a) for a in (q, k, v, position, *prefix)))
        return out.to_numpy(), caches[0].to_numpy(), caches[1].to_numpy()

    own, own_k, own_v = attend(k_cache, v_cache, (np.arange(rows, dtype=np.int64), np.zeros(rows, np.int64)))
    shared_out, shared_k, _ = attend(poisoned_k, poisoned_v, (np.array(prefix_rows, np.int64), lengths))
    assert np.isfinite(own).all()
    np.testing.assert_array_equal(shared_out, own)
    written = np.isfinite(poisoned_k)  # the new positions are written as without sharing
    np.testing.assert_array_equal(shared_k[written], own_k[written])


@pytest.mark.parametrize("prefix_rows,lengths,match", [
    ([0, 2], [0, 0], "prefix row out of range"), ([0, 0], [0, 4], "prefix length beyond"),
    ([1, 1], [3, 3], "prefix length beyond")])
def test_cached_query_attention_refuses_a_prefix_it_cannot_hold(kernel_graphs, prefix_rows, lengths, match):
    from max.driver import Buffer

    arrays = (np.zeros((2, HEADS, HEAD_DIM, 8), np.float32), np.zeros((2, HEADS, 8, HEAD_DIM), np.float32),
              *[np.zeros((2, HEADS, HEAD_DIM), np.float32)] * 3, np.array([3, 2], np.int64),
              np.array(prefix_rows, np.int64), np.array(lengths, np.int64))
    with pytest.raises(Exception, match=match):
        kernel_graphs[3].execute(*(Buffer.from_numpy(a) for a in arrays))


@pytest.mark.parametrize("m,k,n", [(1, 384, 51865), (6, 384, 1536), (11, 1536, 384), (3, 64, 37)])
def test_fp16_weight_matmul_equals_stock_fp32_matmul(kernel_graphs, m, k, n):
    """Same fp32 FMA order over k as MAX's own matmul on the widened weights: bit for bit."""
    from max.driver import Buffer

    rng = np.random.default_rng(n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float16)
    ours, stock = (o.to_numpy() for o in kernel_graphs[1].execute(Buffer.from_numpy(x), Buffer.from_numpy(w)))
    np.testing.assert_array_equal(ours, stock)
    assert np.abs(ours - x.astype(np.float64) @ w.astype(np.float64)).max() < 1e-4


# (k, n): the vocabulary's partial last panel, a 4x-deep one, a ragged small one; and a chunk of tiles
# (CHUNK_BYTES) that is not a whole number of panels: (768, 3072) fp16 and (384, 4096) int8 (5 and 21 tiles a
# chunk; n wide enough that a thread's share holds several chunks on up to 4 threads)
PANEL_SHAPES = ((384, 51865), (1536, 384), (64, 37), (768, 3072))
INT8_PANEL_SHAPES = ((1536, 384), (64, 128), (384, 4096))  # the int8 build's: k and n multiples of 64


@pytest.fixture(scope="module")
def panel_matmul():
    """One graph: per PANEL_SHAPES fp16_panel_matmul and MAX's own matmul on the widened [k, n] weight, per
    INT8_PANEL_SHAPES int8_panel_matmul and int8_weight_matmul on the [k, n] values."""
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    from graph_builders.kernels import KERNELS_PATH, PANEL, fp16_panel_matmul, int8_panel_matmul, int8_weight_matmul

    cpu = DeviceRef.CPU()
    inputs = []
    for i, (k, n) in enumerate(PANEL_SHAPES):
        inputs += [TensorType(DType.float32, [f"m{i}", k], cpu),
                   TensorType(DType.float16, [-(-n // PANEL), k * PANEL], cpu), TensorType(DType.float16, [k, n], cpu)]
    for i, (k, n) in enumerate(INT8_PANEL_SHAPES):
        inputs += [TensorType(DType.float32, [f"q{i}", k], cpu), TensorType(DType.int8, [n // PANEL, k * PANEL], cpu),
                   TensorType(DType.int8, [k, n], cpu), TensorType(DType.float32, [k // 64, n], cpu)]
    with Graph("panel_matmul_kernel", input_types=inputs, custom_extensions=[KERNELS_PATH]) as graph:
        values = [v.tensor for v in graph.inputs]
        outputs = []
        for i, (k, n) in enumerate(PANEL_SHAPES):
            x, panels, w = values[3 * i:3 * i + 3]
            outputs += [fp16_panel_matmul(x, panels, n), x @ ops.cast(w, DType.float32)]
        for i in range(len(INT8_PANEL_SHAPES)):
            x, panels, w, scale = values[3 * len(PANEL_SHAPES) + 4 * i:][:4]
            outputs += [int8_panel_matmul(x, panels, scale), int8_weight_matmul(x, w, scale)]
        graph.output(*outputs)
    return InferenceSession(devices=[CPU()]).load(graph)


@pytest.mark.parametrize("m", [1, 3, 6, 18, 40])
def test_panel_matmuls_equal_the_row_major_products(panel_matmul, m):
    """A weight packed in panels (the runtime's "panels" transform) gives the same products bit for bit:
    fp16 MAX's own fp32 matmul, int8 int8_weight_matmul's, over one-, few- and many-row tiles, threads'
    shares, chunks of tiles (18 int8 rows: passes of 8, 8 and 2, the last in wide tiles) and a last panel
    the outputs do not fill."""
    from max.driver import Buffer

    from graph_builders.weights import int8_part, quantize, transform

    rng = np.random.default_rng(m)
    arrays, weights = [], []
    for k, n in PANEL_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)  # (out, in), as a checkpoint stores it
        arrays += [x, transform(w, "panels", np.float16), np.ascontiguousarray(w.T)]
        weights.append((x, w))
    for k, n in INT8_PANEL_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
        values, scale = quantize(w)
        panels = int8_part({"source": "w", "transform": "panels", "dtype": "int8"}, w, {})
        arrays += [x, panels, values, scale]
    outputs = [o.to_numpy() for o in panel_matmul.execute(*(Buffer.from_numpy(a) for a in arrays))]
    n_fp16 = 2 * len(PANEL_SHAPES)
    for (x, w), ours, stock in zip(weights, outputs[0:n_fp16:2], outputs[1:n_fp16:2]):
        assert ours.shape == (m, w.shape[0])
        np.testing.assert_array_equal(ours, stock)
        assert np.abs(ours - x.astype(np.float64) @ w.T.astype(np.float64)).max() < 1e-4
    for (k, n), ours, rowmajor in zip(INT8_PANEL_SHAPES, outputs[n_fp16::2], outputs[n_fp16 + 1::2]):
        assert ours.shape == (m, n) and np.abs(ours).max() > 0
        np.testing.assert_array_equal(ours, rowmajor)


@pytest.mark.parametrize("m,k,n", [(1, 384, 51865), (5, 512, 1536), (11, 1536, 384), (3, 64, 37)])
def test_int8_weight_matmul_matches_numpy(kernel_graphs, m, k, n):
    """Each group of 64 rows of a column times its own scale, over tile widths, ragged tails and row
    counts the decoder's steps and prefills use; a group of zero scale adds nothing."""
    from max.driver import Buffer

    rng = np.random.default_rng(n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    scale = (rng.random((k // 64, n)) * 0.01).astype(np.float32)
    scale[:, n // 2] = 0
    ours = kernel_graphs[4].execute(*(Buffer.from_numpy(a) for a in (x, w, scale)))[0].to_numpy()
    expected = x.astype(np.float64) @ (w.astype(np.float64) * np.repeat(scale, 64, axis=0))
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    assert not ours[:, n // 2].any()


def _dynamic_int8(kernel_graphs, x, weight):
    """quantize_rows and dynamic_int8_matmul (VNNI and portable) on x and `weight` (out, in), packed
    as the runtime packs it; returns q, its scales, both products and the weight's int8 values and scales."""
    from max.driver import Buffer

    from graph_builders.weights import quantize_per_output

    packed, w_scale = quantize_per_output(weight)
    bias = np.linspace(-1, 1, weight.shape[0], dtype=np.float32)
    q, q_scale, vnni, portable = (o.to_numpy() for o in kernel_graphs[6].execute(
        *(Buffer.from_numpy(a) for a in (x, packed, w_scale, bias))))
    n, k = weight.shape
    w_int8 = packed.reshape(n // 64, k // 4, 64, 4).transpose(0, 2, 1, 3).reshape(n, k)
    return q, q_scale, vnni, portable, w_int8, w_scale, bias


def test_quantize_rows_gives_each_64_values_of_a_row_their_own_scale(kernel_graphs):
    """One symmetric scale per 64 values of a row (max |x| / 127; 1 for zeros), values offset to 1..255."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 128)).astype(np.float32)
    x[2, :64] = 0
    x[4, 7] = 300.0  # an outlier coarsens its own 64 values only
    q, q_scale, *_ = _dynamic_int8(kernel_graphs, x, rng.standard_normal((64, 128)).astype(np.float32))
    expected_scale = np.abs(x).reshape(9, 2, 64).max(axis=2) / 127
    expected_scale[2, 0] = 1
    np.testing.assert_allclose(q_scale, expected_scale, rtol=1e-6)
    assert q.dtype == np.uint8 and q.min() >= 1 and q.max() <= 255 and np.all(q[2, :64] == 128)
    per_value = np.repeat(q_scale, 64, axis=1)
    error = np.abs((q.astype(np.float64) - 128) * per_value - x)
    assert np.all(error <= per_value * 0.5 * (1 + 1e-5))
    assert q[4, 7] == 255 and error[4, :64].max() > 10 * error[4, 64:].max()


@pytest.mark.parametrize("m,k,n", [(1, 64, 64), (7, 384, 128), (13, 1536, 192), (100, 2048, 128), (1500, 384, 384),
                                   (1501, 512, 64)])
def test_dynamic_int8_matmul_sums_exactly(kernel_graphs, m, k, n):
    """Each 64 columns' integer products summed exactly, times their row scale, then the weight scale and
    the bias: over micro-tile and thread tails (row counts off 6 and 16, uneven halves), column tiles and
    the encoder's widths; the fast path (AMX tiles for blocks of 16 rows where the CPU has them and Linux
    grants them, VNNI for the rest) and the portable one give the same bits."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    q, q_scale, vnni, portable, w_int8, w_scale, bias = _dynamic_int8(kernel_graphs, x, weight)
    np.testing.assert_array_equal(vnni, portable)
    groups = [(q[:, g:g + 64].astype(np.int64) - 128) @ w_int8[:, g:g + 64].T.astype(np.int64)
              for g in range(0, k, 64)]
    expected = sum(part * q_scale[:, [i]].astype(np.float64) for i, part in enumerate(groups)) * w_scale + bias
    assert np.abs(vnni - expected).max() <= 1e-6 * np.abs(expected).max()
    # and it is the product it approximates
    exact = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    assert np.abs(vnni - exact).max() < 0.03 * np.abs(exact).max()


@pytest.mark.parametrize("m,k", [(1, 128), (7, 384), (13, 128), (40, 512)])
def test_int8_logits_recompute_the_ones_near_each_rows_best_from_the_fp16_rows(kernel_graphs, m, k):
    """The int8 products (as dynamic_int8_matmul's, no bias) everywhere but within the margin of a
    row's best, where the logit is the fp32 product with the embedding's fp16 row: over a vocabulary
    that ends in a partial tile, row counts off the micro tile, VNNI and portable paths bit-equal."""
    from max.driver import Buffer

    from graph_builders.graphs import RESCORE_MARGIN
    from graph_builders.weights import quantize_per_output

    rng = np.random.default_rng(m * k)
    hidden = rng.standard_normal((m, k)).astype(np.float32)
    embedding = (rng.standard_normal((LOGITS_VOCAB, k)) * 3 / np.sqrt(k)).astype(np.float16)
    packed, w_scale = quantize_per_output(embedding)
    q, q_scale, vnni, portable = (o.to_numpy() for o in kernel_graphs[7].execute(
        *(Buffer.from_numpy(a) for a in (hidden, packed, w_scale, embedding))))
    np.testing.assert_array_equal(vnni, portable)
    assert vnni.shape == (m, LOGITS_VOCAB)
    w_int8 = packed.reshape(-1, k // 4, 64, 4).transpose(0, 2, 1, 3).reshape(-1, k)[:LOGITS_VOCAB]
    approx = sum(((q[:, g:g + 64].astype(np.int64) - 128) @ w_int8[:, g:g + 64].T.astype(np.int64))
                 * q_scale[:, [g // 64]].astype(np.float64) for g in range(0, k, 64)) * w_scale[:LOGITS_VOCAB]
    exact = hidden.astype(np.float64) @ embedding.astype(np.float64).T
    near = approx >= approx.max(axis=1, keepdims=True) - RESCORE_MARGIN
    assert near.sum() > m and (~near).sum() > 100 * m  # both kinds in every case
    np.testing.assert_allclose(vnni[near], exact[near], rtol=1e-5, atol=1e-5)
    assert np.abs(vnni[~near] - approx[~near]).max() <= 1e-6 * np.abs(approx).max()
    assert np.array_equal(vnni.argmax(axis=1), exact.argmax(axis=1))
