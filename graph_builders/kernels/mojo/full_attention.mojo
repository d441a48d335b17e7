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
from std.memory.alloc import unsafe_alloc
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, register

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
        var B = q.dim_size(0)
        var N = q.dim_size(1)
        var ld = q.dim_size(2)
        if ld % HEAD_DIM != 0 or ld == 0:
            raise Error("full_attention: the state width must be a multiple of the head width 64")
        for t in range(3):
            if k.dim_size(t) != q.dim_size(t) or v.dim_size(t) != q.dim_size(t):
                raise Error("full_attention: q, k and v must have one shape")
        if N < 1 or B < 1:
            return
        var H = ld // HEAD_DIM
        var mp = ceildiv(N, KT) * KT
        var nthreads = max(1, parallelism_level(None))
        # Enough (batch, head, row slice) tasks for every thread; a slice is whole register tiles.
        var slices = ceildiv(nthreads, B * H)
        var slice_rows = ceildiv(ceildiv(N, slices), RT) * RT
        slices = ceildiv(N, slice_rows)
        var tasks = B * H * slices
        var workers = min(nthreads, tasks)
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var op = output.unsafe_ptr()

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
