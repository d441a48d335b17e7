"""Custom Mojo kernels for the Whisper MAX runtime.

``fp16_weight_matmul(x, w)``: out[M, N] f32 = x[M, K] f32 @ f32(w[K, N] f16),
fp32 accumulation (CPU; reads the weight as fp16 = half the bytes of fp32).
``fp16_panel_matmul(x, w, n)``: the same product from the weight packed in panels of 64 columns.
``int8_weight_matmul(x, w, scale)``: the same over int8 weights with one scale per 64 rows of a column;
``int8_panel_matmul(x, w, scale)`` from the int8 weight in panels.
``quantize_rows(x)`` and ``dynamic_int8_matmul(q, q_scale, w, w_scale, bias)``: int8 activations times
int8 weights, summed exactly in int32 (AMX tiles or AVX-512 VNNI where the CPU has them), for the int8 build's encoder.
``int8_logits(hidden, q, q_scale, w, w_scale, embedding, margin)``: the int8 build's logits the same way,
those near each row's best recomputed in fp32 from the embedding's fp16 rows.
``full_attention(q, k, v)``: the encoder's self-attention over every row, fused (scores stay in cache);
``full_attention(q, k, v, bf16=True)``: the same with its products in bf16 AMX tiles (the int8 build's encoder).

Usage::

    from graph_builders.kernels import KERNELS_PATH, fp16_weight_matmul
    with Graph("g", input_types=[...], custom_extensions=[KERNELS_PATH]) as g:
        y = fp16_weight_matmul(x, w)          # w: a float16 [K, N] Weight/tensor
    compiled = InferenceSession(devices=[CPU()]).compile(g)

``KERNELS_PATH`` is the Mojo source package directory (``kernels/mojo``);
MAX runs ``mojo precompile`` on it (into /tmp/.modular_<uid>/mojo_pkg/) each
time a Graph / session is given it.  ``build_mojoc(out)`` prebuilds a
``.mojoc`` that can be passed instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from max.dtype import DType
from max.graph import BufferValue, DeviceRef, StaticDim, TensorType, TensorValue, ops

from contracts import INT8_GROUP  # rows of an int8 weight column that share one scale (the kernel's GROUP)
from contracts import PANEL_WIDTH

KERNELS_DIR = Path(__file__).resolve().parent
KERNELS_PATH = KERNELS_DIR / "mojo"
OP_NAME = "fp16_weight_matmul"
INT8_OP_NAME = "int8_weight_matmul"
PANEL_OP_NAME = "fp16_panel_matmul"
INT8_PANEL_OP_NAME = "int8_panel_matmul"
PANEL = PANEL_WIDTH  # columns of a packed fp16 weight's panel (weight_matmul.mojo, PANEL)
ATTENTION_OP_NAME = "single_query_attention"
GROUPED_ATTENTION_OP_NAME = "grouped_query_attention"
GROUPED_ATTENTION_F16KV_OP_NAME = "grouped_query_attention_f16kv"
CACHED_ATTENTION_OP_NAME = "cached_query_attention"
FULL_ATTENTION_OP_NAME = "full_attention"
FULL_ATTENTION_BF16_OP_NAME = "full_attention_bf16"
QUANTIZE_ROWS_OP_NAME = "quantize_rows"
DYNAMIC_INT8_OP_NAME = "dynamic_int8_matmul"
INT8_LOGITS_OP_NAME = "int8_logits"
DYNAMIC_INT8_TILE = 64  # the packed weight's column tile (dynamic_int8_matmul.mojo, NT)
ATTENTION_HEAD_DIM = 64  # the kernel's head width: every official Whisper model's

__all__ = ["ATTENTION_HEAD_DIM", "DYNAMIC_INT8_TILE", "INT8_GROUP", "KERNELS_PATH", "OP_NAME", "PANEL", "build_mojoc",
           "cached_query_attention", "dynamic_int8_matmul", "fp16_panel_matmul", "fp16_weight_matmul", "full_attention",
           "grouped_query_attention", "int8_panel_matmul",
           "int8_logits", "int8_weight_matmul", "quantize_rows", "single_query_attention"]


def fp16_weight_matmul(x: TensorValue, w: TensorValue) -> TensorValue:
    """x [M, K] float32 @ w [K, N] float16 -> [M, N] float32 (fp32 accumulate).

    The enclosing Graph must have been created with
    ``custom_extensions=[KERNELS_PATH]`` (or a prebuilt .mojoc).
    ``M`` may be symbolic.  CPU only.
    """
    x = TensorValue(x)
    w = TensorValue(w)
    if x.rank != 2 or w.rank != 2:
        raise ValueError(f"expected rank-2 x and w, got {x.shape} and {w.shape}")
    if x.dtype != DType.float32 or w.dtype != DType.float16:
        raise TypeError(
            f"expected x float32 and w float16, got {x.dtype} and {w.dtype}"
        )
    out_type = TensorType(
        DType.float32, [x.shape[0], w.shape[1]], device=DeviceRef.CPU()
    )
    return ops.custom(
        OP_NAME, device=DeviceRef.CPU(), values=[x, w], out_types=[out_type]
    )[0].tensor


def fp16_panel_matmul(x: TensorValue, w: TensorValue, n_out: int) -> TensorValue:
    """x [M, K] float32 @ W [K, n_out] -> [M, n_out] float32, W given as float16 panels of 64 columns,
    w [ceil(n_out / 64), K * 64] with w[p, k * 64 + c] = W[k, 64p + c] (the last panel zero-padded):
    fp16_weight_matmul's products in its order (the same values), each tile reading its panel as one
    sequential stream. Same graph requirements as fp16_weight_matmul.  CPU only.
    """
    x, w = TensorValue(x), TensorValue(w)
    if x.rank != 2 or w.rank != 2:
        raise ValueError(f"expected rank-2 x and w, got {x.shape} and {w.shape}")
    if x.dtype != DType.float32 or w.dtype != DType.float16:
        raise TypeError(f"expected x float32 and w float16, got {x.dtype} and {w.dtype}")
    panels = -(-n_out // PANEL)
    if int(w.shape[0]) != panels or int(w.shape[1]) != int(x.shape[1]) * PANEL:
        raise ValueError(f"expected w [{panels}, {x.shape[1]} * {PANEL}] for {n_out} outputs, got {w.shape}")
    out_type = TensorType(DType.float32, [x.shape[0], n_out], device=DeviceRef.CPU())
    return ops.custom(PANEL_OP_NAME, device=DeviceRef.CPU(), values=[x, w], out_types=[out_type])[0].tensor


def int8_weight_matmul(x: TensorValue, w: TensorValue, scale: TensorValue) -> TensorValue:
    """x [M, K] float32 @ (w [K, N] int8 * scale [K / 64, N] float32, each scale row repeated over its
    64 rows of w) -> [M, N] float32 (fp32 accumulate, one partial sum per group of 64 rows).

    w holds symmetric int8 values with one scale per INT8_GROUP rows of each column: a quarter of
    fp32's bytes. K must be a multiple of 64. Same graph requirements as fp16_weight_matmul.  CPU only.
    """
    return _int8_matmul(INT8_OP_NAME, "[K, N]", x, w, scale)


def int8_panel_matmul(x: TensorValue, w: TensorValue, scale: TensorValue) -> TensorValue:
    """int8_weight_matmul from the int8 weight packed in panels of 64 columns, w [N / 64, K * 64] with
    w[p, k * 64 + c] = W[k, 64p + c], scale [K / 64, N]: the same values. K and N multiples of 64."""
    return _int8_matmul(INT8_PANEL_OP_NAME, "[N/64, K*64]", x, w, scale)


def _int8_matmul(op_name: str, layout: str, x: TensorValue, w: TensorValue, scale: TensorValue) -> TensorValue:
    """One of the int8-weight matmuls, x [M, K] times w (`layout`) with scale [K / 64, N] -> [M, N]."""
    x, w, scale = TensorValue(x), TensorValue(w), TensorValue(scale)
    if x.rank != 2 or w.rank != 2 or scale.rank != 2:
        raise ValueError(f"expected x [M, K], w {layout}, scale [K/64, N], got {x.shape}, {w.shape}, {scale.shape}")
    if x.dtype != DType.float32 or w.dtype != DType.int8 or scale.dtype != DType.float32:
        raise TypeError(f"expected x float32, w int8, scale float32, got {x.dtype}, {w.dtype}, {scale.dtype}")
    out_type = TensorType(DType.float32, [x.shape[0], scale.shape[1]], device=DeviceRef.CPU())
    return ops.custom(op_name, device=DeviceRef.CPU(), values=[x, w, scale], out_types=[out_type])[0].tensor


def quantize_rows(x: TensorValue, group: int) -> tuple[TensorValue, TensorValue]:
    """x [M, K] float32 -> (q [M, K] uint8, scale [M, K / group] float32): each `group` consecutive
    values of a row rounded to int8 with one symmetric scale, max |value| / 127 (1 for zeros), stored
    offset by +128 (1..255): x[m, k] ~= (q[m, k] - 128) * scale[m, k // group]. K must be a multiple
    of `group`, `group` of 16. CPU only; needs ``custom_extensions=[KERNELS_PATH]``.
    """
    x = TensorValue(x)
    if x.rank != 2 or x.dtype != DType.float32:
        raise TypeError(f"expected x float32 [M, K], got {x.dtype} {x.shape}")
    columns = x.shape[1]
    if group % 16 or (isinstance(columns, StaticDim) and int(columns) % group):
        raise ValueError(f"quantize_rows: {columns} columns do not split into groups of {group} (a multiple of 16)")
    q, scale = ops.custom(QUANTIZE_ROWS_OP_NAME, device=DeviceRef.CPU(), values=[x],
                          out_types=[TensorType(DType.uint8, x.shape, device=DeviceRef.CPU()),
                                     TensorType(DType.float32, [x.shape[0], columns // group], device=DeviceRef.CPU())])
    return q.tensor, scale.tensor


def dynamic_int8_matmul(q: TensorValue, q_scale: TensorValue, w: TensorValue, w_scale: TensorValue,
                        bias: TensorValue, portable: bool = False) -> TensorValue:
    """quantize_rows's (q, q_scale) times int8 weights -> [M, N] float32: for each group g of q's
    columns, ((q - 128)[:, g] @ w[g, :]) summed exactly in int32, times q_scale[m, g]; the groups'
    sum times w_scale[n], plus bias[n].

    w is the int8 [K, N] weight packed in column tiles of 64: [N / 64, K * 64], element
    [t, g * 256 + c * 4 + j] = w[4g + j, 64t + c] (runtime/engine.py packs it); w_scale [N] and
    bias [N] float32. N must be a multiple of 64, K of 4. AMX tiles for blocks of 16 rows when the CPU
    has them and Linux grants this process their state (groups of 64 columns), AVX-512 VNNI when the CPU
    has it, else (or with ``portable``, for tests) the same sums in widened integer arithmetic: the same
    bits on every path. CPU only; needs ``custom_extensions=[KERNELS_PATH]``.
    """
    q, q_scale, w, w_scale, bias = (TensorValue(v) for v in (q, q_scale, w, w_scale, bias))
    if q.rank != 2 or w.rank != 2 or q_scale.rank != 2 or w_scale.rank != 1 or bias.rank != 1:
        raise ValueError(f"expected q [M, K], q_scale [M, groups], w [N/64, K*64], w_scale [N], bias [N], got "
                         f"{q.shape}, {q_scale.shape}, {w.shape}, {w_scale.shape}, {bias.shape}")
    if (q.dtype != DType.uint8 or w.dtype != DType.int8
            or any(v.dtype != DType.float32 for v in (q_scale, w_scale, bias))):
        raise TypeError("dynamic_int8_matmul takes uint8 q, int8 w and float32 scales and bias")
    out_type = TensorType(DType.float32, [q.shape[0], w_scale.shape[0]], device=DeviceRef.CPU())
    return ops.custom(DYNAMIC_INT8_OP_NAME, device=DeviceRef.CPU(), values=[q, q_scale, w, w_scale, bias],
                      out_types=[out_type], parameters={"portable": portable})[0].tensor


def int8_logits(hidden: TensorValue, q: TensorValue, q_scale: TensorValue, w: TensorValue, w_scale: TensorValue,
                embedding: TensorValue, margin: float, portable: bool = False) -> TensorValue:
    """The int8 build's logits [M, V] float32: quantize_rows's (q, q_scale) of hidden [M, K] float32 times
    the token embedding packed as dynamic_int8_matmul's w ([ceil(V / 64), K * 64], one scale per token
    in w_scale, padded to whole tiles of 64), then every logit within `margin` of its row's best
    recomputed in float32 as hidden[m] . embedding[n] from the embedding's float16 rows [V, K]. The
    int8 products move a logit near the top by a few tenths at most, so the tokens that could be a
    row's best are among those recomputed. CPU only; needs ``custom_extensions=[KERNELS_PATH]``.
    """
    hidden, q, q_scale, w, w_scale, embedding = (TensorValue(v) for v in (hidden, q, q_scale, w, w_scale, embedding))
    if hidden.dtype != DType.float32 or embedding.dtype != DType.float16 or q.dtype != DType.uint8:
        raise TypeError("int8_logits takes float32 hidden states, uint8 q and float16 embedding rows")
    vocab = embedding.shape[0]
    if not isinstance(vocab, StaticDim):
        raise ValueError("int8_logits needs a static vocabulary size")
    tiles = -(-int(vocab) // DYNAMIC_INT8_TILE)
    cpu = DeviceRef.CPU()
    rows = hidden.shape[0]
    out_types = [TensorType(DType.float32, [rows, vocab], device=cpu),
                 TensorType(DType.float32, [rows, tiles], device=cpu),  # the op's scratch: each tile's best
                 TensorType(DType.float32, [rows, DYNAMIC_INT8_TILE], device=cpu)]  # and the last tile whole
    return ops.custom(INT8_LOGITS_OP_NAME, device=cpu, values=[q, q_scale, w, w_scale, hidden, embedding],
                      out_types=out_types, parameters={"portable": portable, "margin": float(margin)})[0].tensor


def single_query_attention(q: TensorValue, k_t: TensorValue, v: TensorValue) -> TensorValue:
    """softmax(q @ k_t / 8) @ v for one query per row: q [R, 64], k_t [R, 64, M], v [R, M, 64] -> [R, 64].

    float32 throughout; R and M may be symbolic, M <= 2048. CPU only; the enclosing Graph needs
    ``custom_extensions=[KERNELS_PATH]``.
    """
    q, k_t, v = TensorValue(q), TensorValue(k_t), TensorValue(v)
    if q.rank != 2 or k_t.rank != 3 or v.rank != 3:
        raise ValueError(f"expected q [R, 64], k_t [R, 64, M], v [R, M, 64], got {q.shape}, {k_t.shape}, {v.shape}")
    if any(t.dtype != DType.float32 for t in (q, k_t, v)):
        raise TypeError("single_query_attention computes in float32")
    out_type = TensorType(DType.float32, [q.shape[0], ATTENTION_HEAD_DIM], device=DeviceRef.CPU())
    return ops.custom(ATTENTION_OP_NAME, device=DeviceRef.CPU(), values=[q, k_t, v], out_types=[out_type])[0].tensor


def grouped_query_attention(q: TensorValue, k_t: TensorValue, v: TensorValue, kv_rows: TensorValue) -> TensorValue:
    """single_query_attention where rows share keys and values: q [B, H, 64], k_t [G, H, 64, M],
    v [G, H, M, 64], kv_rows int64 [B] (row b attends to k_t[kv_rows[b]], v[kv_rows[b]]) -> [B, H, 64].

    Rows with the same kv row read its keys and values once between them (the beams of one audio in
    a decoder step's cross-attention); each row's result is bit-identical to single_query_attention's
    on its own keys and values. float32, or keys and values both float16 (widened to fp32 as they
    are read); CPU only; needs ``custom_extensions=[KERNELS_PATH]``.
    """
    q, k_t, v, kv_rows = TensorValue(q), TensorValue(k_t), TensorValue(v), TensorValue(kv_rows)
    if q.rank != 3 or k_t.rank != 4 or v.rank != 4 or kv_rows.rank != 1:
        raise ValueError(f"expected q [B, H, 64], k_t [G, H, 64, M], v [G, H, M, 64], kv_rows [B], got "
                         f"{q.shape}, {k_t.shape}, {v.shape}, {kv_rows.shape}")
    kv_dtype = k_t.dtype
    if (q.dtype != DType.float32 or kv_dtype not in (DType.float32, DType.float16) or v.dtype != kv_dtype
            or kv_rows.dtype != DType.int64):
        raise TypeError("grouped_query_attention computes in float32 over float32 or float16 keys and values, "
                        "and takes int64 kv_rows")
    out_type = TensorType(DType.float32, [q.shape[0], q.shape[1], ATTENTION_HEAD_DIM], device=DeviceRef.CPU())
    name = GROUPED_ATTENTION_OP_NAME if kv_dtype == DType.float32 else GROUPED_ATTENTION_F16KV_OP_NAME
    return ops.custom(name, device=DeviceRef.CPU(), values=[q, k_t, v, kv_rows], out_types=[out_type])[0].tensor


def full_attention(q: TensorValue, k: TensorValue, v: TensorValue, bf16: bool = False) -> TensorValue:
    """softmax(q_h @ k_h^T / 8) @ v_h for every head h and every query row, the heads side by side in
    the last axis: q, k, v [B, N, H * 64] (the linears' layout) -> [B, N, H * 64]; each row attends to
    all N rows of its batch entry (the encoder's self-attention). float32; B and N may be symbolic.
    bf16: where the CPU has AMX and Linux grants this process its tiles, both products in bf16 tiles
    summed in fp32 (q / 8, k, v and the softmax's weights rounded to bf16: about 1e-2 of the largest
    value off float64, where the fp32 op is 2e-6), else the fp32 op's computation. CPU only; needs
    ``custom_extensions=[KERNELS_PATH]``.
    """
    q, k, v = TensorValue(q), TensorValue(k), TensorValue(v)
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise ValueError(f"expected q, k, v [B, N, H * 64], got {q.shape}, {k.shape}, {v.shape}")
    if any(t.dtype != DType.float32 for t in (q, k, v)):
        raise TypeError("full_attention computes in float32")
    if not isinstance(q.shape[2], StaticDim) or int(q.shape[2]) % ATTENTION_HEAD_DIM:
        raise ValueError(f"full_attention: {q.shape[2]} is not a static multiple of the head width {ATTENTION_HEAD_DIM}")
    return ops.custom(FULL_ATTENTION_BF16_OP_NAME if bf16 else FULL_ATTENTION_OP_NAME, device=DeviceRef.CPU(),
                      values=[q, k, v], out_types=[TensorType(DType.float32, q.shape, device=DeviceRef.CPU())])[0].tensor


def cached_query_attention(k_cache: BufferValue, v_cache: BufferValue, q: TensorValue, k: TensorValue,
                           v: TensorValue, position: TensorValue, prefix_rows: TensorValue,
                           prefix_lengths: TensorValue) -> TensorValue:
    """A decoder step's self-attention over a cache it extends in place: writes k [B, H, 64] into
    k_cache [B, H, 64, C] and v [B, H, 64] into v_cache [B, H, C, 64] at each row's `position`
    (int64 [B], < C), then returns single_query_attention's result over the row's positions up to
    its own -> [B, H, 64]. Rows at different positions (requests joined at different times) step together.

    prefix_rows, prefix_lengths (int64 [B]): row b's first prefix_lengths[b] positions hold the same
    keys and values as row prefix_rows[b]'s (beams of one audio with the same tokens there; at most
    either row's position). The rows naming one prefix row read those positions once between them;
    the result is the same bits whatever they name (arange and zeros: every row reads its own).

    float32; CPU only; needs ``custom_extensions=[KERNELS_PATH]``.
    """
    q, k, v, position = TensorValue(q), TensorValue(k), TensorValue(v), TensorValue(position)
    prefix_rows, prefix_lengths = TensorValue(prefix_rows), TensorValue(prefix_lengths)
    if q.rank != 3 or k.rank != 3 or v.rank != 3 or k_cache.rank != 4 or v_cache.rank != 4:
        raise ValueError(f"expected q, k, v [B, H, 64] and caches [B, H, 64, C], [B, H, C, 64], got "
                         f"{q.shape}, {k.shape}, {v.shape}, {k_cache.shape}, {v_cache.shape}")
    out_type = TensorType(DType.float32, [q.shape[0], q.shape[1], ATTENTION_HEAD_DIM], device=DeviceRef.CPU())
    return ops.inplace_custom(CACHED_ATTENTION_OP_NAME, device=DeviceRef.CPU(),
                              values=[k_cache, v_cache, q, k, v, position, prefix_rows, prefix_lengths],
                              out_types=[out_type])[0].tensor


def build_mojoc(out: str | Path) -> Path:
    """Precompiles KERNELS_PATH into a .mojoc file (``mojo precompile``).

    The module name is baked from the output file stem, so keep the stem
    stable (e.g. ``whisper_kernels.mojoc``).
    """
    from mojo.run import subprocess_run_mojo  # type: ignore[import-not-found]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess_run_mojo(
        ["precompile", str(KERNELS_PATH), "-o", str(out)],
        capture_output=True,
        check=True,
    )
    return out
