# int8 x int8 matmul custom ops for MAX (CPU, AVX-512 VNNI): the int8 build's audio rows, and its
# logits (int8_logits, below _cpu_dynamic_int8_matmul: the same products, then the logits near each
# row's best recomputed in fp32).
#
#   quantize_rows:       x[M, K] (f32) -> q[M, K] (u8), scale[M, G] (f32): each K/G consecutive
#                        values of a row share one symmetric scale, max |x| / 127 (1 for zeros);
#                        q = round(x / scale) + 128 (in 1..255).
#   dynamic_int8_matmul: output[m, n] (f32) = w_scale[n] * sum over groups g of
#                        scale[m, g] * ((q[m, g's columns] - 128) @ w[g's rows, n] (i8)) + bias[n],
#                        each group's sum exact in int32.
#
# The products are vpdpbusd's (unsigned bytes times signed bytes, four per int32 lane, summed):
# four times the multiply-adds of an fp32 FMA per instruction. Activations are therefore stored
# offset by +128 as unsigned bytes; the offset is taken back out with the column sums of w over
# each group (sum_k (q - 128) * w = sum_k q * w - 128 * sum_k w), which the kernel computes per
# column tile with the same instruction on a vector of ones. No product or sum rounds:
# |sum| <= 255 * 127 * K. A scale per 64 values of a row rather than per row: outlier channels of
# the activations then coarsen their own group only (the encoder's error against fp32 drops by
# about a third in a torch simulation on base), for ~15% more time (the groups' float sums).
#
# w is packed for the instruction: column tiles of 64, each holding its K/4 groups of four rows
# as 64 columns x 4 consecutive rows (256 bytes; one zmm per 16 columns). Shape [N / 64, K * 64];
# element [t, g * 256 + c * 4 + j] = w[4g + j, 64t + c]. The runtime packs it at load.
#
# Work is split over rows across the runtime's CPU threads; each thread walks its rows in blocks
# (about 512 KB of q, to stay in L2), and within a block every column tile (its weight panel stays
# in L1/L2) over every 6-row micro tile: 6 x 4 int32 zmm accumulators. Measured on a 2-core AMD
# EPYC (AVX-512 VNNI), 1500 rows: 2.3-3.6x MAX's fp32 matmul on the encoder's shapes.
#
# Where the CPU has AMX (Intel Sapphire Rapids and later) and Linux grants this process its tile
# state, whole blocks of 16 rows take the same integer sums from AMX's tile multiply instead
# (tdpbusd: the same unsigned x signed byte products, summed exactly in int32), one scale group
# (64 columns of q: one A tile's row) at a time, then the same float operations in the same order:
# the same bits as the VNNI path. The rows left over (fewer than 16) take the VNNI micro tiles.
from std.math import ceildiv
from std.memory import bitcast
from std.memory.alloc import unsafe_alloc
from std.sys import CompilationTarget, llvm_intrinsic
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, register
from .amx import AMX_ROWS, amx_configure, amx_granted, amx_release, tile_dpbusd, tile_load, tile_store, tile_zero

comptime LANES = 16  # int32 / fp32 lanes per zmm
comptime TILE_VECTORS = 4  # zmm vectors per column tile
comptime TILE_COLUMNS = LANES * TILE_VECTORS  # columns per tile (the packing's tile width)
comptime MICRO_ROWS = 6  # rows per micro tile
comptime MAX_GROUPS = 80  # scale groups per row (K / 64 for K up to 5120)
comptime BLOCK_BYTES = 512 * 1024  # q bytes per row block
comptime OFFSET = 128  # the unsigned offset of q


@always_inline
def _dot4_u8_i8[PORTABLE: Bool](acc: SIMD[DType.int32, LANES], a: SIMD[DType.int32, LANES], b: SIMD[DType.int8, 64]) -> SIMD[DType.int32, LANES]:
    """Returns acc + per lane the sum of 4 products of a's unsigned bytes with b's signed bytes."""
    comptime if CompilationTarget.has_vnni() and not PORTABLE:
        return llvm_intrinsic["llvm.x86.avx512.vpdpbusd.512", SIMD[DType.int32, LANES]](
            acc, bitcast[DType.int8, 64](a), b
        )
    else:
        # Without AVX-512 VNNI: the same sums, widened (slower, exact: |product| <= 255 * 127).
        var products = bitcast[DType.uint8, 64](a).cast[DType.int32]() * b.cast[DType.int32]()
        var pairs = products.deinterleave()
        var halves = (pairs[0] + pairs[1]).deinterleave()
        return acc + halves[0] + halves[1]


@always_inline
def _packed_weights(wp: Pointer[Int8, MutAnyOrigin], off: Int) -> SIMD[DType.int8, 64]:
    return wp.unsafe_load[width=64](off)


@always_inline
def _dynamic_micro_tile[
    MB: Int, PORTABLE: Bool, BIASED: Bool
](
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    bp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    colsum: Pointer[SIMD[DType.int32, LANES], _],
    m0: Int,
    K: Int,
    G: Int,
    t: Int,
    out_stride: Int,
    out_col: Int,
):
    """Rows m0..m0+MB of column tile t into op[m, out_col + c] (rows out_stride apart)."""
    var panel = t * K * TILE_COLUMNS
    var n0 = t * TILE_COLUMNS
    var fours = K // G // 4  # groups of four bytes per scale group
    for grp in range(G):
        var acc = Array[SIMD[DType.int32, LANES], MB * TILE_VECTORS](fill=0)
        for g in range(grp * fours, (grp + 1) * fours):
            var wv = Array[SIMD[DType.int8, 64], TILE_VECTORS](fill=0)
            comptime for v in range(TILE_VECTORS):
                wv[v] = _packed_weights(wp, panel + g * 4 * TILE_COLUMNS + v * 64)
            comptime for m in range(MB):
                var four = bitcast[DType.int32, 1](qp.unsafe_load[width=4]((m0 + m) * K + g * 4))
                var a = SIMD[DType.int32, LANES](four[0])
                comptime for v in range(TILE_VECTORS):
                    acc[m * TILE_VECTORS + v] = _dot4_u8_i8[PORTABLE](acc[m * TILE_VECTORS + v], a, wv[v])
        # The group's exact sums, scaled by the rows' group scales, into the output (in L1): the
        # float sums would need as many registers again as the integer ones.
        comptime for v in range(TILE_VECTORS):
            var offset = colsum[grp * TILE_VECTORS + v] * OFFSET
            comptime for m in range(MB):
                var scale = SIMD[DType.float32, LANES](sp[unsafe_offset=(m0 + m) * G + grp])
                var at = (m0 + m) * out_stride + out_col + v * LANES
                var part = (acc[m * TILE_VECTORS + v] - offset).cast[DType.float32]()
                if grp == 0:
                    op.unsafe_store(at, part * scale)
                else:
                    op.unsafe_store(at, part.fma(scale, op.unsafe_load[width=LANES](at)))
    comptime for v in range(TILE_VECTORS):
        var ws = wsp.unsafe_load[width=LANES](n0 + v * LANES)
        comptime for m in range(MB):
            var at = (m0 + m) * out_stride + out_col + v * LANES
            comptime if BIASED:
                var bias = bp.unsafe_load[width=LANES](n0 + v * LANES)
                op.unsafe_store(at, op.unsafe_load[width=LANES](at).fma(ws, bias))
            else:
                op.unsafe_store(at, op.unsafe_load[width=LANES](at) * ws)


@always_inline
def _dynamic_rows[
    PORTABLE: Bool, BIASED: Bool
](
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    bp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    colsum: Pointer[SIMD[DType.int32, LANES], _],
    m_begin: Int,
    m_end: Int,
    K: Int,
    G: Int,
    t: Int,
    out_stride: Int,
    out_col: Int,
):
    """Rows m_begin..m_end of column tile t, in micro tiles of 6 rows and one of the rest."""
    var m0 = m_begin
    while m0 + MICRO_ROWS <= m_end:
        _dynamic_micro_tile[MICRO_ROWS, PORTABLE, BIASED](
            qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col
        )
        m0 += MICRO_ROWS
    var rest = m_end - m0
    if rest == 5:
        _dynamic_micro_tile[5, PORTABLE, BIASED](qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col)
    elif rest == 4:
        _dynamic_micro_tile[4, PORTABLE, BIASED](qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col)
    elif rest == 3:
        _dynamic_micro_tile[3, PORTABLE, BIASED](qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col)
    elif rest == 2:
        _dynamic_micro_tile[2, PORTABLE, BIASED](qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col)
    elif rest == 1:
        _dynamic_micro_tile[1, PORTABLE, BIASED](qp, sp, wp, wsp, bp, op, colsum, m0, K, G, t, out_stride, out_col)


@always_inline
def _dynamic_column_sums[
    PORTABLE: Bool
](wp: Pointer[Int8, MutAnyOrigin], K: Int, G: Int, t: Int, mut sums: Array[SIMD[DType.int32, LANES], TILE_VECTORS * MAX_GROUPS]):
    """Sets sums to each scale group's sum over its k of w[k, 64t + c], as 4 x 16 int32 lanes a group."""
    var ones = SIMD[DType.int32, LANES](0x01010101)
    for i in range(G * TILE_VECTORS):
        sums[i] = 0
    var panel = t * K * TILE_COLUMNS
    var fours = K // G // 4
    for g in range(K // 4):
        comptime for v in range(TILE_VECTORS):
            var i = (g // fours) * TILE_VECTORS + v
            sums[i] = _dot4_u8_i8[PORTABLE](sums[i], ones, _packed_weights(wp, panel + g * 4 * TILE_COLUMNS + v * 64))


def _cpu_dynamic_int8_matmul[PORTABLE: Bool](
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    bp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    N: Int,
    G: Int,
) raises:
    comptime if not PORTABLE:
        if M >= AMX_ROWS and K == G * AMX_GROUP_BYTES and amx_granted():
            _cpu_amx_int8_matmul(qp, sp, wp, wsp, bp, op, M, K, N, G)
            return
    var ntiles = N // TILE_COLUMNS
    var nthreads = max(1, min(parallelism_level(None), ceildiv(M, MICRO_ROWS)))
    var rows_per = ceildiv(ceildiv(M, nthreads), MICRO_ROWS) * MICRO_ROWS
    var block = max(MICRO_ROWS, (BLOCK_BYTES // K) // MICRO_ROWS * MICRO_ROWS)

    def work(tid: Int) raises {var}:
        var colsum = Array[SIMD[DType.int32, LANES], TILE_VECTORS * MAX_GROUPS](fill=0)
        var cs = colsum.unsafe_ptr()
        var r0 = tid * rows_per
        var r1 = min(r0 + rows_per, M)
        var b0 = r0
        while b0 < r1:
            var b1 = min(b0 + block, r1)
            for t in range(ntiles):
                _dynamic_column_sums[PORTABLE](wp, K, G, t, colsum)
                _dynamic_rows[PORTABLE, True](qp, sp, wp, wsp, bp, op, cs, b0, b1, K, G, t, N, t * TILE_COLUMNS)
            b0 = b1

    sync_parallelize(work, nthreads)


# ---------------------------------------------------------------------------- AMX (amx.mojo)
comptime AMX_GROUP_BYTES = 64  # bytes of an A tile's row: one scale group of q
comptime AMX_SUMS = AMX_ROWS * TILE_COLUMNS  # int32 sums of one group over a 16-row block of a column tile


@always_inline
def _amx_block(
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    bp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    colsum: Pointer[SIMD[DType.int32, LANES], _],
    sums: Pointer[Int32, MutAnyOrigin],
    scaled: Pointer[Float32, MutAnyOrigin],
    m0: Int,
    K: Int,
    G: Int,
    t: Int,
    N: Int,
):
    """Rows m0..m0+16 of column tile t into op (rows N apart): per scale group, the 16 x 64 exact sums
    from four tile multiplies (A: the group's 64 bytes of 16 rows of q; B: the packed panel's 16 groups
    of four rows, 16 columns each), then _dynamic_micro_tile's float operations in its order.
    sums: 2 x AMX_SUMS int32, scaled: AMX_SUMS float32 (contiguous: the output's 16 rows, 8 KB apart at
    N = 2048, fell in one set of L1 and evicted each other)."""
    var panel = wp.unsafe_offset(t * K * TILE_COLUMNS)
    var qbytes = qp.unsafe_bitcast[Int8]()
    comptime B_STRIDE = 4 * TILE_COLUMNS  # bytes from one group of four rows of the panel to the next
    # Group grp's sums are stored into one half of `sums` while the other half's (group grp - 1,
    # stored an iteration earlier) are scaled: the tile unit multiplies while the vector units scale,
    # and no load reads what a tile store has only just written (a stall of ~20 cycles a load).
    for grp in range(G + 1):
        if grp < G:
            tile_zero[0]()
            tile_zero[1]()
            tile_zero[2]()
            tile_zero[3]()
            tile_load[4](qbytes.unsafe_offset(m0 * K + grp * AMX_GROUP_BYTES), K)
            var b = panel.unsafe_offset(grp * (AMX_GROUP_BYTES // 4) * B_STRIDE)
            tile_load[5](b, B_STRIDE)
            tile_dpbusd[0, 4, 5]()
            tile_load[6](b.unsafe_offset(64), B_STRIDE)
            tile_dpbusd[1, 4, 6]()
            tile_load[7](b.unsafe_offset(128), B_STRIDE)
            tile_dpbusd[2, 4, 7]()
            tile_load[5](b.unsafe_offset(192), B_STRIDE)
            tile_dpbusd[3, 4, 5]()
        if grp > 0:
            var prev = grp - 1
            var done = sums.unsafe_offset((prev % 2) * AMX_SUMS)
            comptime for v in range(TILE_VECTORS):
                var offset = colsum[unsafe_offset=prev * TILE_VECTORS + v] * OFFSET
                for m in range(AMX_ROWS):
                    var scale = SIMD[DType.float32, LANES](sp[unsafe_offset=(m0 + m) * G + prev])
                    var at = m * TILE_COLUMNS + v * LANES
                    var part = (done.unsafe_load[width=LANES](at) - offset).cast[DType.float32]()
                    if prev == 0:
                        scaled.unsafe_store(at, part * scale)
                    else:
                        scaled.unsafe_store(at, part.fma(scale, scaled.unsafe_load[width=LANES](at)))
        if grp < G:
            var into = sums.unsafe_offset((grp % 2) * AMX_SUMS)
            tile_store[0](into, B_STRIDE)
            tile_store[1](into.unsafe_offset(LANES), B_STRIDE)
            tile_store[2](into.unsafe_offset(2 * LANES), B_STRIDE)
            tile_store[3](into.unsafe_offset(3 * LANES), B_STRIDE)
    comptime for v in range(TILE_VECTORS):
        var ws = wsp.unsafe_load[width=LANES](t * TILE_COLUMNS + v * LANES)
        var bias = bp.unsafe_load[width=LANES](t * TILE_COLUMNS + v * LANES)
        for m in range(AMX_ROWS):
            var at = (m0 + m) * N + t * TILE_COLUMNS + v * LANES
            op.unsafe_store(at, scaled.unsafe_load[width=LANES](m * TILE_COLUMNS + v * LANES).fma(ws, bias))


def _cpu_amx_int8_matmul(
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    bp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    N: Int,
    G: Int,
) raises:
    """_cpu_dynamic_int8_matmul's product, the same bits: blocks of 16 rows from AMX, the rest of each
    thread's rows from the VNNI micro tiles. K = 64 G; AMX granted (amx_granted)."""
    var ntiles = N // TILE_COLUMNS
    var nthreads = max(1, min(parallelism_level(None), ceildiv(M, AMX_ROWS)))
    var rows_per = ceildiv(ceildiv(M, nthreads), AMX_ROWS) * AMX_ROWS
    var block = max(AMX_ROWS, (BLOCK_BYTES // K) // AMX_ROWS * AMX_ROWS)

    def work(tid: Int) raises {var}:
        var colsum = Array[SIMD[DType.int32, LANES], TILE_VECTORS * MAX_GROUPS](fill=0)
        var cs = colsum.unsafe_ptr()
        var mem = unsafe_alloc[Int32](3 * AMX_SUMS + 16, alignment=64)
        var sums = mem.unsafe_origin_cast[MutAnyOrigin]()
        var scaled = sums.unsafe_offset(2 * AMX_SUMS).unsafe_bitcast[Float32]()
        amx_configure(sums.unsafe_offset(3 * AMX_SUMS).unsafe_bitcast[UInt8]())  # the tile configuration is per thread
        var r0 = tid * rows_per
        var r1 = min(r0 + rows_per, M)
        var b0 = r0
        while b0 < r1:
            var b1 = min(b0 + block, r1)
            var whole = b0 + (b1 - b0) // AMX_ROWS * AMX_ROWS
            for t in range(ntiles):
                _dynamic_column_sums[False](wp, K, G, t, colsum)
                for m0 in range(b0, whole, AMX_ROWS):
                    _amx_block(qp, sp, wp, wsp, bp, op, cs, sums, scaled, m0, K, G, t, N)
                if whole < b1:
                    _dynamic_rows[False, True](qp, sp, wp, wsp, bp, op, cs, whole, b1, K, G, t, N, t * TILE_COLUMNS)
            b0 = b1
        amx_release()  # the thread's tiles back to their initial state: a context switch then saves none
        mem.unsafe_free()

    sync_parallelize(work, nthreads)


def _cpu_int8_logits[PORTABLE: Bool](
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Int8, MutAnyOrigin],
    wsp: Pointer[Float32, MutAnyOrigin],
    hp: Pointer[Float32, MutAnyOrigin],
    ep: Pointer[Float16, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    tile_max: Pointer[Float32, MutAnyOrigin],
    tail: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    V: Int,
    G: Int,
    margin: Float32,
) raises:
    var ntiles = ceildiv(V, TILE_COLUMNS)
    var full = V // TILE_COLUMNS
    # 1. The int8 logits, the column tiles split over the threads: a few rows (a step's), so each
    # tile's weight panel is read from memory once for all of them. Each row's largest value per tile
    # goes to tile_max.
    var nthreads = max(1, min(parallelism_level(None), ntiles))
    var tiles_per = ceildiv(ntiles, nthreads)

    def products(tid: Int) raises {var}:
        var colsum = Array[SIMD[DType.int32, LANES], TILE_VECTORS * MAX_GROUPS](fill=0)
        var cs = colsum.unsafe_ptr()
        for t in range(tid * tiles_per, min((tid + 1) * tiles_per, ntiles)):
            _dynamic_column_sums[PORTABLE](wp, K, G, t, colsum)
            # unbiased: the bias pointer (wsp) is never read
            if t < full:
                _dynamic_rows[PORTABLE, False](qp, sp, wp, wsp, wsp, op, cs, 0, M, K, G, t, V, t * TILE_COLUMNS)
                for m in range(M):
                    var peak = op.unsafe_load[width=LANES](m * V + t * TILE_COLUMNS)
                    comptime for v in range(1, TILE_VECTORS):
                        peak = max(peak, op.unsafe_load[width=LANES](m * V + t * TILE_COLUMNS + v * LANES))
                    tile_max.unsafe_store(m * ntiles + t, peak.reduce_max())
            else:  # the vocabulary's last, partial tile: computed whole into `tail`, its columns copied
                _dynamic_rows[PORTABLE, False](qp, sp, wp, wsp, wsp, tail, cs, 0, M, K, G, t, TILE_COLUMNS, 0)
                for m in range(M):
                    var peak = Float32.MIN
                    for n in range(t * TILE_COLUMNS, V):
                        var value = tail[unsafe_offset=m * TILE_COLUMNS + n - t * TILE_COLUMNS]
                        op.unsafe_store(m * V + n, value)
                        peak = max(peak, value)
                    tile_max.unsafe_store(m * ntiles + t, peak)

    sync_parallelize(products, nthreads)

    # 2. Each row's logits within `margin` of its best, recomputed in fp32 from the hidden state and
    # the embedding's own fp16 row: only tiles whose largest value is that near are read again.
    var row_threads = max(1, min(parallelism_level(None), M))
    var rows_per = ceildiv(M, row_threads)

    def rescore(tid: Int) raises {var}:
        for m in range(tid * rows_per, min((tid + 1) * rows_per, M)):
            var best = Float32.MIN
            for t in range(ntiles):
                best = max(best, tile_max[unsafe_offset=m * ntiles + t])
            var near = best - margin
            for t in range(ntiles):
                if tile_max[unsafe_offset=m * ntiles + t] < near:
                    continue
                for n in range(t * TILE_COLUMNS, min(V, (t + 1) * TILE_COLUMNS)):
                    if op[unsafe_offset=m * V + n] < near:
                        continue
                    var acc = SIMD[DType.float32, LANES](0)
                    for k in range(0, K, LANES):
                        acc = hp.unsafe_load[width=LANES](m * K + k).fma(
                            ep.unsafe_load[width=LANES](n * K + k).cast[DType.float32](), acc)
                    op.unsafe_store(m * V + n, acc.reduce_add())

    sync_parallelize(rescore, row_threads)


def _cpu_quantize_rows(
    xp: Pointer[Float32, MutAnyOrigin],
    qp: Pointer[UInt8, MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    G: Int,
) raises:
    var nthreads = max(1, min(parallelism_level(None), M))
    var rows_per = ceildiv(M, nthreads)
    var width = K // G

    def work(tid: Int) raises {var}:
        for m in range(tid * rows_per, min((tid + 1) * rows_per, M)):
            for grp in range(G):
                var first = m * K + grp * width
                var peak = SIMD[DType.float32, LANES](0)
                for k in range(0, width, LANES):
                    peak = max(peak, abs(xp.unsafe_load[width=LANES](first + k)))
                var largest = peak.reduce_max()
                var scale = largest / 127 if largest > 0 else Float32(1)
                var inverse = 1 / scale
                sp.unsafe_store(m * G + grp, scale)
                for k in range(0, width, LANES):
                    var q = round(xp.unsafe_load[width=LANES](first + k) * inverse).clamp(-127, 127)
                    qp.unsafe_store(first + k, (q.cast[DType.int32]() + OFFSET).cast[DType.uint8]())

    sync_parallelize(work, nthreads)


@register("quantize_rows")
struct QuantizeRows:
    """Quantizes each row: q[M, K] (u8) = round(x / scale[m]) + 128, scale[M] = max |x[m, :]| / 127 (1 for a zero row)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        q: OutputTensor[dtype=DType.uint8, rank=2, ...],
        scale: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("quantize_rows: only the CPU target is implemented")
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var G = scale.dim_size(1)
        if (G < 1 or K % G != 0 or (K // G) % LANES != 0 or q.dim_size(0) != M or q.dim_size(1) != K
                or scale.dim_size(0) != M):
            raise Error("quantize_rows: shape mismatch (a group must be a multiple of 16 wide)")
        _cpu_quantize_rows(x.unsafe_ptr(), q.unsafe_ptr(), scale.unsafe_ptr(), M, K, G)


@register("dynamic_int8_matmul")
struct DynamicInt8Matmul:
    """Computes out[M, N] (f32) = ((q - 128) @ w) * scale[m] * w_scale[n] + bias[n], w packed [N / 64, K * 64]."""

    @staticmethod
    def execute[
        target: StaticString, portable: Bool
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=DType.uint8, rank=2, ...],
        scale: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.int8, rank=2, ...],
        w_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        bias: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("dynamic_int8_matmul: only the CPU target is implemented")
        var M = q.dim_size(0)
        var K = q.dim_size(1)
        var N = w_scale.dim_size(0)
        var G = scale.dim_size(1)
        if (G < 1 or G > MAX_GROUPS or K % (4 * G) != 0 or N % TILE_COLUMNS != 0 or scale.dim_size(0) != M
                or w.dim_size(0) != N // TILE_COLUMNS
                or w.dim_size(1) != K * TILE_COLUMNS or bias.dim_size(0) != N or output.dim_size(0) != M
                or output.dim_size(1) != N):
            raise Error("dynamic_int8_matmul: shape mismatch (N must be a multiple of 64, a scale group of 4 "
                        "columns of q, at most 80 groups)")
        _cpu_dynamic_int8_matmul[portable](q.unsafe_ptr(), scale.unsafe_ptr(), w.unsafe_ptr(), w_scale.unsafe_ptr(),
                              bias.unsafe_ptr(), output.unsafe_ptr(), M, K, N, G)


@register("int8_logits")
struct Int8Logits:
    """The int8 build's logits: hidden[M, K] (f32, quantized to q, scale by quantize_rows) times the
    token embedding packed as dynamic_int8_matmul's weight [ceil(V / 64), K * 64] with one scale per
    token (w_scale, padded to whole tiles), then every logit within `margin` of its row's best
    recomputed as hidden[m] . f32(embedding[n]) from the embedding's own fp16 rows [V, K].
    Outputs: logits [M, V], and two the op works in (each row's largest value per tile,
    [M, ceil(V / 64)]; the last tile whole, [M, 64])."""

    @staticmethod
    def execute[
        target: StaticString, portable: Bool, margin: Float32
    ](
        logits: OutputTensor[dtype=DType.float32, rank=2, ...],
        tile_max: OutputTensor[dtype=DType.float32, rank=2, ...],
        tail: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=DType.uint8, rank=2, ...],
        scale: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.int8, rank=2, ...],
        w_scale: InputTensor[dtype=DType.float32, rank=1, ...],
        hidden: InputTensor[dtype=DType.float32, rank=2, ...],
        embedding: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("int8_logits: only the CPU target is implemented")
        var M = q.dim_size(0)
        var K = q.dim_size(1)
        var V = embedding.dim_size(0)
        var G = scale.dim_size(1)
        var ntiles = ceildiv(V, TILE_COLUMNS)
        if (G < 1 or G > MAX_GROUPS or K % (4 * G) != 0 or K % LANES != 0 or scale.dim_size(0) != M
                or w.dim_size(0) != ntiles or w.dim_size(1) != K * TILE_COLUMNS
                or w_scale.dim_size(0) != ntiles * TILE_COLUMNS or hidden.dim_size(0) != M
                or hidden.dim_size(1) != K or embedding.dim_size(1) != K or logits.dim_size(0) != M
                or logits.dim_size(1) != V or tile_max.dim_size(0) != M or tile_max.dim_size(1) != ntiles
                or tail.dim_size(0) != M or tail.dim_size(1) != TILE_COLUMNS):
            raise Error("int8_logits: shape mismatch")
        _cpu_int8_logits[portable](q.unsafe_ptr(), scale.unsafe_ptr(), w.unsafe_ptr(), w_scale.unsafe_ptr(),
                                   hidden.unsafe_ptr(), embedding.unsafe_ptr(), logits.unsafe_ptr(),
                                   tile_max.unsafe_ptr(), tail.unsafe_ptr(), M, K, V, G, margin)
