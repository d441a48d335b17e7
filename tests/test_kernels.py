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


@pytest.fixture(scope="module")
def kernel_graphs():
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType, ops

    from graph_builders.kernels import KERNELS_PATH, fp16_weight_matmul, single_query_attention

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
    return attention, matmul


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
