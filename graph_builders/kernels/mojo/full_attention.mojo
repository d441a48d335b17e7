# Full self-attention over many query rows, fused (the encoder's layers), CPU.
#
#   out[b, n, h*64:(h+1)*64] = softmax(q_h[b, n] @ k_h[b]^T / 8) @ v_h[b]
#   q, k, v, out [B, N, H*64] f32: the linears' own layout, so no permute goes in or out of the op
#
# MAX's stock ops run this as a batched matmul into [B, H, N, N] scores, a softmax over them and a
# second batched matmul: base's 8 heads x 1500^2 scores are 72 MB, written and read three times
# (the softmax alone took 10 ms of a layer's ~31 on an Intel Xeon), and q @ k^T with its 64-long
# inner dimension ran at ~150 GFLOP/s where a 512-wide linear runs at ~280. Here each (batch, head)
# first copies its keys, transposed, and its values into contiguous scratch (the heads of a row
# interleave 256-byte pieces at a 2 KB stride, which would alias in the cache's sets), then takes
# QB query rows at a time: their scores from register tiles of RT rows x 64 keys (each key vector
# loaded once for RT rows, each query value broadcast once for 64 keys), scaled, kept in a QB x M
# buffer that stays in L2, each row's largest noted as the tiles are stored; one pass of exp() and
# sums over each row; the rows' weighted sums of the values from register tiles of RT rows x 64
# dims, divided by the row's sum at the end. fp32 throughout: a score sums over d in order, as the
# stock matmul does, and is scaled after; the softmax's and the weighted sum's summation order and
# the division after the sum (MAX's softmax normalizes first) differ from the stock ops, at fp32
# rounding (both ~7e-6 from float64 at N = 1500).
from std.math import ceildiv, exp
from std.memory import bitcast
from std.memory.alloc import unsafe_alloc
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, register
from .amx import AMX_ROWS, amx_configure, amx_granted, amx_release, tile_dpbf16ps, tile_load, tile_store, tile_zero

comptime W16 = 16  # fp32 lanes per zmm
comptime HEAD_DIM = 64  # every Whisper model's head width
comptime NVD = HEAD_DIM // W16
comptime RT = 6  # query rows per register tile: 6 x 4 accumulators + 4 loaded vectors + 1 broadcast < 32 zmm
comptime KT = 64  # keys per score tile
comptime NVK = KT // W16
comptime KEY_PAD = 16  # a key row's stride is mp + 16 floats: at mp = 1536 the 64 rows of a tile fell in 8 of L1's sets
comptime QB = 48  # query rows per block (a multiple of RT): their scores are QB x ceil(M / 64) * 64 floats


@always_inline
def _score_tile[
    NR: Int
](
    qp: Pointer[Float32, MutAnyOrigin],
    q0: Int,
    ld: Int,
    kt: Pointer[Float32, MutAnyOrigin],
    ks: Int,
    mp: Int,
    sp: Pointer[Float32, MutAnyOrigin],
    r0: Int,
    m0: Int,
    N: Int,
    rmax: Pointer[Float32, MutAnyOrigin],
    scale: Float32,
):
    """Scaled scores of NR query rows (q at q0 + i * ld) against keys m0..m0+63: sp[(r0 + i) * mp + m];
    rmax[r0 + i] takes the largest of them for keys below N."""
    var acc = Array[SIMD[DType.float32, W16], NR * NVK](fill=0)
    for d in range(HEAD_DIM):
        var kv = Array[SIMD[DType.float32, W16], NVK](fill=0)
        comptime for c in range(NVK):
            kv[c] = kt.unsafe_load[width=W16](d * ks + m0 + c * W16)
        comptime for i in range(NR):
            var qd = SIMD[DType.float32, W16](qp[unsafe_offset=q0 + i * ld + d])
            comptime for c in range(NVK):
                acc[i * NVK + c] = kv[c].fma(qd, acc[i * NVK + c])
    comptime for i in range(NR):
        var tile_max = SIMD[DType.float32, W16](-3.0e38)
        comptime for c in range(NVK):
            acc[i * NVK + c] = acc[i * NVK + c] * scale
            sp.unsafe_store((r0 + i) * mp + m0 + c * W16, acc[i * NVK + c])
            tile_max = max(tile_max, acc[i * NVK + c])
        var row_max = rmax[unsafe_offset=r0 + i]
        if m0 + KT <= N:
            row_max = max(row_max, tile_max.reduce_max())
        else:  # the last tile's keys past N are padding
            for m in range(m0, N):
                row_max = max(row_max, sp[unsafe_offset=(r0 + i) * mp + m])
        rmax.unsafe_store(r0 + i, row_max)


@always_inline
def _value_tile[
    NR: Int
](
    sp: Pointer[Float32, MutAnyOrigin],
    mp: Int,
    r0: Int,
    vl: Pointer[Float32, MutAnyOrigin],
    M: Int,
    op: Pointer[Float32, MutAnyOrigin],
    o0: Int,
    ld: Int,
    rinv: Pointer[Float32, MutAnyOrigin],
):
    """out rows o0 + i * ld (64 values each) = rinv[r0 + i] * sum over m < M of e[r0 + i, m] * v[m, :]."""
    var acc = Array[SIMD[DType.float32, W16], NR * NVD](fill=0)
    for m in range(M):
        var vv = Array[SIMD[DType.float32, W16], NVD](fill=0)
        comptime for c in range(NVD):
            vv[c] = vl.unsafe_load[width=W16](m * HEAD_DIM + c * W16)
        comptime for i in range(NR):
            var pm = SIMD[DType.float32, W16](sp[unsafe_offset=(r0 + i) * mp + m])
            comptime for c in range(NVD):
                acc[i * NVD + c] = vv[c].fma(pm, acc[i * NVD + c])
    comptime for i in range(NR):
        var inv = SIMD[DType.float32, W16](rinv[unsafe_offset=r0 + i])
        comptime for c in range(NVD):
            op.unsafe_store(o0 + i * ld + c * W16, acc[i * NVD + c] * inv)


@always_inline
def _exp_row(sp: Pointer[Float32, MutAnyOrigin], row: Int, M: Int, row_max: Float32) -> Float32:
    """sp[row + m] = exp(sp[row + m] - row_max) for m < M; returns 1 / their sum."""
    var nv = M // W16
    var vsum = SIMD[DType.float32, W16](0)
    for j in range(nv):
        var e = exp(sp.unsafe_load[width=W16](row + j * W16) - row_max)
        sp.unsafe_store(row + j * W16, e)
        vsum += e
    var total = vsum.reduce_add()
    for m in range(nv * W16, M):
        var e = exp(sp[unsafe_offset=row + m] - row_max)
        sp.unsafe_store(row + m, e)
        total += e
    return 1.0 / total


def _score_rows(
    n: Int,
    qp: Pointer[Float32, MutAnyOrigin],
    q0: Int,
    ld: Int,
    kt: Pointer[Float32, MutAnyOrigin],
    ks: Int,
    mp: Int,
    sp: Pointer[Float32, MutAnyOrigin],
    r0: Int,
    m0: Int,
    N: Int,
    rmax: Pointer[Float32, MutAnyOrigin],
    scale: Float32,
):
    """_score_tile for the n < RT rows left at the end of a block."""
    if n == 5:
        _score_tile[5](qp, q0, ld, kt, ks, mp, sp, r0, m0, N, rmax, scale)
    elif n == 4:
        _score_tile[4](qp, q0, ld, kt, ks, mp, sp, r0, m0, N, rmax, scale)
    elif n == 3:
        _score_tile[3](qp, q0, ld, kt, ks, mp, sp, r0, m0, N, rmax, scale)
    elif n == 2:
        _score_tile[2](qp, q0, ld, kt, ks, mp, sp, r0, m0, N, rmax, scale)
    elif n == 1:
        _score_tile[1](qp, q0, ld, kt, ks, mp, sp, r0, m0, N, rmax, scale)


def _value_rows(
    n: Int,
    sp: Pointer[Float32, MutAnyOrigin],
    mp: Int,
    r0: Int,
    vl: Pointer[Float32, MutAnyOrigin],
    M: Int,
    op: Pointer[Float32, MutAnyOrigin],
    o0: Int,
    ld: Int,
    rinv: Pointer[Float32, MutAnyOrigin],
):
    """_value_tile for the n < RT rows left at the end of a block."""
    if n == 5:
        _value_tile[5](sp, mp, r0, vl, M, op, o0, ld, rinv)
    elif n == 4:
        _value_tile[4](sp, mp, r0, vl, M, op, o0, ld, rinv)
    elif n == 3:
        _value_tile[3](sp, mp, r0, vl, M, op, o0, ld, rinv)
    elif n == 2:
        _value_tile[2](sp, mp, r0, vl, M, op, o0, ld, rinv)
    elif n == 1:
        _value_tile[1](sp, mp, r0, vl, M, op, o0, ld, rinv)


def _attend_rows(
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    kt: Pointer[Float32, MutAnyOrigin],
    vl: Pointer[Float32, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    rmax: Pointer[Float32, MutAnyOrigin],
    rinv: Pointer[Float32, MutAnyOrigin],
    b: Int,
    h: Int,
    n_begin: Int,
    n_end: Int,
    N: Int,
    ld: Int,
    mp: Int,
):
    """Query rows n_begin..n_end of (batch b, head h) over all N keys and values of b."""
    var scale = Float32(0.125)  # 1 / sqrt(64)
    var head = h * HEAD_DIM
    # keys transposed into kt [64, mp + KEY_PAD] (positions past N zero), values into vl [N, 64]
    for m in range(N):
        var src = (b * N + m) * ld + head
        for d in range(HEAD_DIM):
            kt.unsafe_store(d * (mp + KEY_PAD) + m, kp[unsafe_offset=src + d])
        comptime for c in range(NVD):
            vl.unsafe_store(m * HEAD_DIM + c * W16, vp.unsafe_load[width=W16](src + c * W16))
    for d in range(HEAD_DIM):
        for m in range(N, mp):
            kt.unsafe_store(d * (mp + KEY_PAD) + m, Float32(0))
    for start in range(n_begin, n_end, QB):
        var rows = min(QB, n_end - start)
        var q_start = (b * N + start) * ld + head
        var full = rows - rows % RT
        for r in range(rows):
            rmax.unsafe_store(r, Float32(-3.0e38))
        for m0 in range(0, mp, KT):
            for r in range(0, full, RT):
                _score_tile[RT](qp, q_start + r * ld, ld, kt, mp + KEY_PAD, mp, sp, r, m0, N, rmax, scale)
            _score_rows(rows - full, qp, q_start + full * ld, ld, kt, mp + KEY_PAD, mp, sp, full, m0, N, rmax, scale)
        for r in range(rows):
            rinv.unsafe_store(r, _exp_row(sp, r * mp, N, rmax[unsafe_offset=r]))
        for r in range(0, full, RT):
            _value_tile[RT](sp, mp, r, vl, N, op, q_start + r * ld, ld, rinv)
        _value_rows(rows - full, sp, mp, full, vl, N, op, q_start + full * ld, ld, rinv)


# ---------------------------------------------------------------------------- bf16 tiles (AMX)
# full_attention_bf16 (the int8 build's encoder): the same attention with its two products in AMX
# tiles, bf16 x bf16 summed in fp32 (tdpbf16ps); q (scaled by 1/8 first, exactly), k, v and the
# softmax's weights rounded to bf16, the scores, the softmax and the weighted sums fp32. Where the CPU
# has no AMX (or Linux does not grant it) the op computes full_attention's fp32 instead.
#
# Per (batch, head) the keys and values are packed as the tiles read them: keys in blocks of 16
# (kpack: for each half of the head's 64 dims, 16 rows of 16 keys x a pair of dims), values in blocks
# of 32 keys (vpack: 16 rows of 64 dims x a pair of keys); then 16 query rows at a time: their scores
# against 64 keys per pass (4 C tiles, each 2 products over the halves of the dims) into sc [16, mk],
# each row's exp() and sum in fp32 with the weights rounded into pb [16, mv] bf16, and the weighted
# sums over 32 keys per product (4 C tiles for the 64 dims, kept in the tiles over every key).
comptime PAIR_ROW = 2 * AMX_ROWS  # bf16 in a tile row: 16 pairs
comptime KEY_ROW_BYTES = 2 * PAIR_ROW  # a packed key block's rows are contiguous


@always_inline
def _bf16(x: SIMD[DType.float32, W16]) -> SIMD[DType.bfloat16, W16]:
    """x rounded to bf16, to nearest even, in integer arithmetic: without AVX-512 BF16 among the
    target's features LLVM converts one value at a time (the first version spent 70% of its time there).
    Finite values only (the attention's are)."""
    var bits = bitcast[DType.uint32, W16](x)
    var rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return bitcast[DType.bfloat16, W16]((rounded >> 16).cast[DType.uint16]())


@always_inline
def _pack_head(
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    kpack: Pointer[BFloat16, MutAnyOrigin],
    vpack: Pointer[BFloat16, MutAnyOrigin],
    b: Int,
    h: Int,
    N: Int,
    ld: Int,
    nkb: Int,
    nvb: Int,
):
    """kpack[((half * nkb + kb) * 16 + p) * 32 + j * 2 + e] = k[kb * 16 + j, half * 32 + 2p + e] and
    vpack[(vb * 16 + p) * 128 + d * 2 + e] = v[vb * 32 + 2p + e, d] in bf16; keys past N zero."""
    var kwords = kpack.unsafe_bitcast[UInt32]()
    for m in range(nkb * AMX_ROWS):
        var kb = m // AMX_ROWS
        var j = m % AMX_ROWS
        comptime for half in range(2):
            var pairs = SIMD[DType.uint32, 16](0)
            if m < N:
                var row = (b * N + m) * ld + h * HEAD_DIM + half * 32
                var lo = _bf16(kp.unsafe_load[width=W16](row))
                var hi = _bf16(kp.unsafe_load[width=W16](row + W16))
                pairs = bitcast[DType.uint32, 16](lo.join(hi))
            var base = ((half * nkb + kb) * AMX_ROWS) * AMX_ROWS + j
            comptime for p in range(16):
                kwords.unsafe_store(base + p * AMX_ROWS, pairs[p])
    for vb in range(nvb):
        for p in range(AMX_ROWS):
            var m = vb * 2 * AMX_ROWS + 2 * p
            comptime for c in range(NVD):
                var even = SIMD[DType.float32, W16](0)
                var odd = SIMD[DType.float32, W16](0)
                if m < N:
                    even = vp.unsafe_load[width=W16]((b * N + m) * ld + h * HEAD_DIM + c * W16)
                if m + 1 < N:
                    odd = vp.unsafe_load[width=W16]((b * N + m + 1) * ld + h * HEAD_DIM + c * W16)
                vpack.unsafe_store((vb * AMX_ROWS + p) * 2 * HEAD_DIM + c * 2 * W16,
                                   _bf16(even).interleave(_bf16(odd)))


def _attend_rows_bf16(
    qp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    kpack: Pointer[BFloat16, MutAnyOrigin],
    vpack: Pointer[BFloat16, MutAnyOrigin],
    qt: Pointer[BFloat16, MutAnyOrigin],
    sc: Pointer[Float32, MutAnyOrigin],
    pb: Pointer[BFloat16, MutAnyOrigin],
    ob: Pointer[Float32, MutAnyOrigin],
    rinv: Pointer[Float32, MutAnyOrigin],
    b: Int,
    h: Int,
    n_begin: Int,
    n_end: Int,
    N: Int,
    ld: Int,
    nkb: Int,
    nvb: Int,
):
    """Query rows n_begin..n_end of (batch b, head h), from the head's packed keys and values."""
    var mk = nkb * AMX_ROWS  # score columns (keys padded to whole passes of 64)
    var mv = nvb * 2 * AMX_ROWS  # weight columns (keys padded to whole blocks of 32)
    var head = h * HEAD_DIM
    for start in range(n_begin, n_end, AMX_ROWS):
        var rows = min(AMX_ROWS, n_end - start)
        for r in range(AMX_ROWS):
            comptime for c in range(NVD):
                var x = SIMD[DType.float32, W16](0)
                if r < rows:
                    x = qp.unsafe_load[width=W16]((b * N + start + r) * ld + head + c * W16) * 0.125
                qt.unsafe_store(r * HEAD_DIM + c * W16, _bf16(x))
        # scores: A = the rows' dims 0..31 (tile 4) and 32..63 (tile 5), B = a block of keys' (6, 7)
        tile_load[4](qt, 2 * HEAD_DIM)
        tile_load[5](qt.unsafe_offset(PAIR_ROW), 2 * HEAD_DIM)
        for kb in range(0, nkb, 4):
            tile_zero[0]()
            tile_zero[1]()
            tile_zero[2]()
            tile_zero[3]()
            var low = kpack.unsafe_offset(kb * AMX_ROWS * PAIR_ROW)
            var high = kpack.unsafe_offset((nkb + kb) * AMX_ROWS * PAIR_ROW)
            comptime B_TILE = AMX_ROWS * PAIR_ROW  # bf16 of a packed key block
            tile_load[6](low, KEY_ROW_BYTES)
            tile_dpbf16ps[0, 4, 6]()
            tile_load[7](high, KEY_ROW_BYTES)
            tile_dpbf16ps[0, 5, 7]()
            tile_load[6](low.unsafe_offset(B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[1, 4, 6]()
            tile_load[7](high.unsafe_offset(B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[1, 5, 7]()
            tile_load[6](low.unsafe_offset(2 * B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[2, 4, 6]()
            tile_load[7](high.unsafe_offset(2 * B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[2, 5, 7]()
            tile_load[6](low.unsafe_offset(3 * B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[3, 4, 6]()
            tile_load[7](high.unsafe_offset(3 * B_TILE), KEY_ROW_BYTES)
            tile_dpbf16ps[3, 5, 7]()
            var at = sc.unsafe_offset(kb * AMX_ROWS)
            tile_store[0](at, 4 * mk)
            tile_store[1](at.unsafe_offset(AMX_ROWS), 4 * mk)
            tile_store[2](at.unsafe_offset(2 * AMX_ROWS), 4 * mk)
            tile_store[3](at.unsafe_offset(3 * AMX_ROWS), 4 * mk)
        # each row's weights: exp(score - the row's largest) over the N keys, rounded to bf16
        for r in range(rows):
            var peak = SIMD[DType.float32, W16](-3.0e38)
            var full = N // W16 * W16
            for m in range(0, full, W16):
                peak = max(peak, sc.unsafe_load[width=W16](r * mk + m))
            var row_max = peak.reduce_max()
            for m in range(full, N):
                row_max = max(row_max, sc[unsafe_offset=r * mk + m])
            var vsum = SIMD[DType.float32, W16](0)
            for m in range(0, full, W16):
                var e = exp(sc.unsafe_load[width=W16](r * mk + m) - row_max)
                vsum += e
                pb.unsafe_store(r * mv + m, _bf16(e))
            # the rest (mv - full is whole vectors): keys past N weigh nothing
            var lane = SIMD[DType.int32, W16](0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
            for m in range(full, mv, W16):
                var key = lane + Int32(m)
                var e = key.lt(Int32(N)).select(exp(sc.unsafe_load[width=W16](r * mk + m) - row_max),
                                                SIMD[DType.float32, W16](0))
                vsum += e
                pb.unsafe_store(r * mv + m, _bf16(e))
            var total = vsum.reduce_add()
            rinv.unsafe_store(r, 1.0 / total)
        # weighted sums: A = 32 keys' weights of the rows (tile 4), B = their values, 16 dims a tile
        tile_zero[0]()
        tile_zero[1]()
        tile_zero[2]()
        tile_zero[3]()
        for vb in range(nvb):
            tile_load[4](pb.unsafe_offset(vb * PAIR_ROW), 2 * mv)
            var values = vpack.unsafe_offset(vb * AMX_ROWS * 2 * HEAD_DIM)
            tile_load[5](values, 4 * HEAD_DIM)
            tile_dpbf16ps[0, 4, 5]()
            tile_load[6](values.unsafe_offset(PAIR_ROW), 4 * HEAD_DIM)
            tile_dpbf16ps[1, 4, 6]()
            tile_load[7](values.unsafe_offset(2 * PAIR_ROW), 4 * HEAD_DIM)
            tile_dpbf16ps[2, 4, 7]()
            tile_load[5](values.unsafe_offset(3 * PAIR_ROW), 4 * HEAD_DIM)
            tile_dpbf16ps[3, 4, 5]()
        tile_store[0](ob, 4 * HEAD_DIM)
        tile_store[1](ob.unsafe_offset(W16), 4 * HEAD_DIM)
        tile_store[2](ob.unsafe_offset(2 * W16), 4 * HEAD_DIM)
        tile_store[3](ob.unsafe_offset(3 * W16), 4 * HEAD_DIM)
        for r in range(rows):
            var inv = SIMD[DType.float32, W16](rinv[unsafe_offset=r])
            comptime for c in range(NVD):
                op.unsafe_store((b * N + start + r) * ld + head + c * W16,
                                ob.unsafe_load[width=W16](r * HEAD_DIM + c * W16) * inv)


def _full_attention_bf16(
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    B: Int,
    N: Int,
    ld: Int,
) raises:
    var H = ld // HEAD_DIM
    var nkb = ceildiv(N, 4 * AMX_ROWS) * 4
    var nvb = ceildiv(N, 2 * AMX_ROWS)
    var nthreads = max(1, parallelism_level(None))
    var slices = ceildiv(nthreads, B * H)
    var slice_rows = ceildiv(ceildiv(N, slices), AMX_ROWS) * AMX_ROWS
    slices = ceildiv(N, slice_rows)
    var tasks = B * H * slices
    var workers = min(nthreads, tasks)

    def work(tid: Int) raises {var}:
        var mk = nkb * AMX_ROWS
        var mv = nvb * 2 * AMX_ROWS
        var bf_mem = unsafe_alloc[BFloat16](2 * nkb * AMX_ROWS * PAIR_ROW + nvb * AMX_ROWS * 2 * HEAD_DIM
                                            + AMX_ROWS * HEAD_DIM + AMX_ROWS * mv, alignment=64)
        var kpack = bf_mem.unsafe_origin_cast[MutAnyOrigin]()
        var vpack = kpack.unsafe_offset(2 * nkb * AMX_ROWS * PAIR_ROW)
        var qt = vpack.unsafe_offset(nvb * AMX_ROWS * 2 * HEAD_DIM)
        var pb = qt.unsafe_offset(AMX_ROWS * HEAD_DIM)
        var f_mem = unsafe_alloc[Float32](AMX_ROWS * mk + AMX_ROWS * HEAD_DIM + AMX_ROWS + 16, alignment=64)
        var sc = f_mem.unsafe_origin_cast[MutAnyOrigin]()
        var ob = sc.unsafe_offset(AMX_ROWS * mk)
        var rinv = ob.unsafe_offset(AMX_ROWS * HEAD_DIM)
        var cfg = rinv.unsafe_offset(AMX_ROWS).unsafe_bitcast[UInt8]()
        amx_configure(cfg)
        for t in range(tid, tasks, workers):
            var s = t % slices
            var bh = t // slices
            _pack_head(kp, vp, kpack, vpack, bh // H, bh % H, N, ld, nkb, nvb)
            _attend_rows_bf16(qp, op, kpack, vpack, qt, sc, pb, ob, rinv, bh // H, bh % H, s * slice_rows,
                              min(N, (s + 1) * slice_rows), N, ld, nkb, nvb)
        amx_release()
        bf_mem.unsafe_free()
        f_mem.unsafe_free()

    sync_parallelize(work, workers)


def _full_attention_fp32(
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    B: Int,
    N: Int,
    ld: Int,
) raises:
    var H = ld // HEAD_DIM
    var mp = ceildiv(N, KT) * KT
    var nthreads = max(1, parallelism_level(None))
    # Enough (batch, head, row slice) tasks for every thread; a slice is whole register tiles.
    var slices = ceildiv(nthreads, B * H)
    var slice_rows = ceildiv(ceildiv(N, slices), RT) * RT
    slices = ceildiv(N, slice_rows)
    var tasks = B * H * slices
    var workers = min(nthreads, tasks)

    def work(tid: Int) raises {var}:
        var kt_mem = unsafe_alloc[Float32](HEAD_DIM * (mp + KEY_PAD), alignment=64)
        var vl_mem = unsafe_alloc[Float32](N * HEAD_DIM, alignment=64)
        var sp_mem = unsafe_alloc[Float32](QB * mp, alignment=64)
        var kt = kt_mem.unsafe_origin_cast[MutAnyOrigin]()
        var vl = vl_mem.unsafe_origin_cast[MutAnyOrigin]()
        var sp = sp_mem.unsafe_origin_cast[MutAnyOrigin]()
        var rows_mem = unsafe_alloc[Float32](2 * QB, alignment=64)
        var rmax = rows_mem.unsafe_origin_cast[MutAnyOrigin]()
        var rinv = rmax.unsafe_offset(QB)
        for t in range(tid, tasks, workers):
            var s = t % slices
            var bh = t // slices
            _attend_rows(qp, kp, vp, op, kt, vl, sp, rmax, rinv, bh // H, bh % H, s * slice_rows,
                         min(N, (s + 1) * slice_rows), N, ld, mp)
        kt_mem.unsafe_free()
        vl_mem.unsafe_free()
        sp_mem.unsafe_free()
        rows_mem.unsafe_free()

    sync_parallelize(work, workers)


def _check_shapes(name: StaticString, q: InputTensor, k: InputTensor, v: InputTensor) raises:
    if q.dim_size(2) % HEAD_DIM != 0 or q.dim_size(2) == 0:
        raise Error(String(name) + ": the state width must be a multiple of the head width 64")
    for t in range(3):
        if k.dim_size(t) != q.dim_size(t) or v.dim_size(t) != q.dim_size(t):
            raise Error(String(name) + ": q, k and v must have one shape")


@register("full_attention")
struct FullAttention:
    """Computes out[b, n, head h] = softmax(q_h[b, n] @ k_h[b]^T / 8) @ v_h[b] for every row n (f32)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("full_attention: only the CPU target is implemented")
        _check_shapes("full_attention", q, k, v)
        if q.dim_size(0) < 1 or q.dim_size(1) < 1:
            return
        _full_attention_fp32(q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), output.unsafe_ptr(), q.dim_size(0),
                             q.dim_size(1), q.dim_size(2))


@register("full_attention_bf16")
struct FullAttentionBf16:
    """full_attention with its products in bf16 AMX tiles (fp32 sums) where the CPU has AMX, else full_attention."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("full_attention_bf16: only the CPU target is implemented")
        _check_shapes("full_attention_bf16", q, k, v)
        if q.dim_size(0) < 1 or q.dim_size(1) < 1:
            return
        if amx_granted():
            _full_attention_bf16(q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), output.unsafe_ptr(), q.dim_size(0),
                                 q.dim_size(1), q.dim_size(2))
        else:
            _full_attention_fp32(q.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), output.unsafe_ptr(), q.dim_size(0),
                                 q.dim_size(1), q.dim_size(2))
