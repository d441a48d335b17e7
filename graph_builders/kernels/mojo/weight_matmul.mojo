# Narrow-weight matmul custom ops for MAX (CPU path).
#
#   fp16_weight_matmul: output[M, N] (f32) = x[M, K] (f32) @ f32(w[K, N] (f16))
#   int8_weight_matmul: output[M, n] (f32) = sum over groups g of
#                       (x[M, g*64:(g+1)*64] @ f32(w[g*64:(g+1)*64, n] (i8))) * scale[g, n]
#   fp16_panel_matmul, int8_panel_matmul: the same products from weights packed in panels of
#                       PANEL=64 columns, w[p, k*64 + c] = W[k, 64p + c]: a tile reads its panel
#                       as one sequential stream, where [K, N] reads 64-128 bytes a row, a row
#                       apart (base's shapes: 1.3-2.2x faster standalone, ~10% of a step)
#
# Weights are read narrow (fp16: half the bytes of fp32, int8: a quarter) and
# widened to fp32 in registers; all products and sums are fp32 (FMA), so the
# fp16 result has fp32 rounding only.  int8 weights are symmetric with one
# scale per group of GROUP=64 rows of each column (w[k, n] ~= w_i8[k, n] *
# scale[k // 64, n]): a group's partial sum is multiplied by its scale and
# added to the column's total.  Work is split over N (column tiles) across the runtime's
# CPU threads; each column tile (64 columns for <= 3 rows of x, 32 otherwise)
# keeps MB x NVT fp32 zmm accumulators live while walking K (sequential
# k-order FMA, bit-identical to MAX's own fp32 matmul on fp32(W)), so every
# weight element is loaded into registers once per MB_MAX=8 rows of x, and
# from memory once (more rows go over a chunk of tiles at a time, in cache).  Software prefetch of
# the tile PF_DIST ahead matters a lot (M=6: ~7 ms -> ~1.6 ms standalone).
# W layout: [K, N] row-major (same orientation as the fp32 weight today).
from std.math import ceildiv
from std.sys import prefetch, size_of
from std.sys.intrinsics import PrefetchOptions
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, register

comptime W16 = 16  # fp32 lanes per zmm
comptime NV = 2  # zmm vectors per column tile (base tile)
comptime TILE = W16 * NV  # output columns per base tile
comptime MB_MAX = 8  # rows of x handled per pass over W
comptime PF_DIST = 2  # prefetch W of the tile PF_DIST tiles ahead
comptime GROUP = 64  # rows of an int8 weight column that share one scale
comptime PANEL = 64  # columns of a packed weight's panel (fp16_panel_matmul)
comptime PF_ROWS = 16  # panels: prefetch this many rows (2 KB of fp16) ahead in the tile's stream
comptime CHUNK_BYTES = 256 * 1024  # weights a chunk of tiles holds, for more than MB_MAX rows (L2)


@always_inline
def _tile[
    MB: Int, NVT: Int, WT: DType, SCALED: Bool, PACKED: Bool
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Scalar[WT], MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    m0: Int,
    K: Int,
    N: Int,
    n0: Int,
    do_prefetch: Bool,
):
    # Where column n0 of row k is (base + k * ld), and what to prefetch: [K, N] row-major: the same row
    # of the tile PF_DIST tiles ahead; panels: PF_ROWS rows further down the tile's own sequential stream.
    var base: Int
    var ld: Int
    var pf_off: Int
    comptime if PACKED:
        base = (n0 // PANEL) * K * PANEL + n0 % PANEL
        ld = PANEL
        pf_off = base + PF_ROWS * PANEL
    else:
        base = n0
        ld = N
        pf_off = n0 + PF_DIST * W16 * NVT
    var acc = Array[SIMD[DType.float32, W16], MB * NVT](fill=0)
    comptime if SCALED:
        for g in range(K // GROUP):
            var part = Array[SIMD[DType.float32, W16], MB * NVT](fill=0)
            _accumulate[MB, NVT, WT](xp, wp, m0, K, base, ld, pf_off, do_prefetch, g * GROUP, (g + 1) * GROUP, part)
            comptime for v in range(NVT):
                var sv = sp.unsafe_load[width=W16](g * N + n0 + v * W16)
                comptime for m in range(MB):
                    acc[m * NVT + v] = part[m * NVT + v].fma(sv, acc[m * NVT + v])
    else:
        _accumulate[MB, NVT, WT](xp, wp, m0, K, base, ld, pf_off, do_prefetch, 0, K, acc)
    comptime for m in range(MB):
        comptime for v in range(NVT):
            var n = n0 + v * W16
            if n + W16 <= N:
                op.unsafe_store((m0 + m) * N + n, acc[m * NVT + v])
            else:  # a padded panel's last columns: only those inside the output
                for j in range(max(0, N - n)):
                    op.unsafe_store((m0 + m) * N + n + j, acc[m * NVT + v][j])


@always_inline
def _accumulate[
    MB: Int, NVT: Int, WT: DType
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Scalar[WT], MutAnyOrigin],
    m0: Int,
    K: Int,
    base: Int,
    ld: Int,
    pf_off: Int,
    do_prefetch: Bool,
    k0: Int,
    k1: Int,
    mut acc: Array[SIMD[DType.float32, W16], MB * NVT],
):
    """acc[m, v] += x[m0 + m, k] * w(k, v*16 ...) for k in k0..k1, in k order; w(k, j) at base + k*ld + j."""
    # weight elements per 64-byte cache line
    comptime LINE = 64 // size_of[WT]()
    for k in range(k0, k1):
        var row = k * ld
        if do_prefetch:
            comptime for l in range(ceildiv(NVT * W16, LINE)):
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                    wp.unsafe_offset(row + pf_off + l * LINE)
                )
        var wv = Array[SIMD[DType.float32, W16], NVT](fill=0)
        comptime for v in range(NVT):
            wv[v] = wp.unsafe_load[width=W16](row + base + v * W16).cast[
                DType.float32
            ]()
        comptime for m in range(MB):
            var xb = SIMD[DType.float32, W16](xp[unsafe_offset=(m0 + m) * K + k])
            comptime for v in range(NVT):
                acc[m * NVT + v] = wv[v].fma(xb, acc[m * NVT + v])


@always_inline
def _tiles_mb[
    MB: Int, WT: DType, SCALED: Bool, PACKED: Bool
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Scalar[WT], MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    m0: Int,
    K: Int,
    N: Int,
    t0: Int,
    t1: Int,
):
    # Wide tiles (more independent FMA chains, each weight vector used by more FMAs) while the
    # accumulators fit the 32 zmm registers with the weight vectors: 6 x 4 + 4 unscaled (base's
    # logits at 5 rows: 2.1 -> 1.6 ms standalone); scaled tiles keep a partial sum per accumulator.
    comptime NVT = NV * 2 if MB <= 3 or (MB <= 6 and not SCALED) else NV
    comptime STEP = NVT // NV
    # [K, N] row-major: no prefetch past the last tiles; panels: prefetch past a panel's end reads the
    # next panel (the last one's is past the weight: a prefetch never faults, and the kernel reads none)
    var pf_limit = N * K if PACKED else N - (PF_DIST + 1) * W16 * NVT
    var t = t0
    while t + STEP <= t1:
        var n0 = t * TILE
        _tile[MB, NVT, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, n0, n0 <= pf_limit)
        t += STEP
    while t < t1:
        var n0 = t * TILE
        _tile[MB, NV, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, n0, n0 <= pf_limit)
        t += 1


def _cpu_matmul[
    WT: DType, SCALED: Bool, PACKED: Bool
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Scalar[WT], MutAnyOrigin],
    sp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    N: Int,
) raises:
    # panels: every tile is whole (the last panel padded), and a thread's tiles start on a panel
    var nfull = ceildiv(N, PANEL) * (PANEL // TILE) if PACKED else N // TILE
    var ntiles = nfull if PACKED else ceildiv(N, TILE)
    var nthreads = max(1, min(parallelism_level(None), ntiles))
    var tiles_per = ceildiv(ntiles, nthreads)
    comptime if PACKED:
        tiles_per = ceildiv(tiles_per, PANEL // TILE) * (PANEL // TILE)

    # More rows than one pass takes: the rows' passes go over one chunk of tiles at a time, whose
    # weights (about CHUNK_BYTES) are read from memory by the first pass and from cache by the others,
    # where passes over all of a thread's tiles read its weights from memory once per MB_MAX rows
    # (base's logits at 40 rows: 5 x 53 MB a step). Each output's k-order sum is the same either way.
    var tile_bytes = K * TILE * size_of[WT]()
    # unscaled passes take at most 6 rows, in wide tiles (_tiles_mb)
    comptime MB_PASS = MB_MAX if SCALED else 6
    var chunk = max(2, CHUNK_BYTES // tile_bytes) if M > MB_PASS else ntiles
    comptime if PACKED:
        # Every chunk starts on a panel, as every thread's share does: a wide tile (_tiles_mb) reads its
        # 64 columns as one panel's, so one starting mid-panel read the next k's values for half of them
        # (an odd chunk: int8 K=384 or 1536, fp16 K=768 or 1280; found as tiny.en int8 prefills whose
        # rows past the first 8 + 8 differed with the batch).
        chunk = ceildiv(chunk, PANEL // TILE) * (PANEL // TILE)

    def work(tid: Int) raises {var}:
        var t0 = tid * tiles_per
        var t1 = min(t0 + tiles_per, nfull)
        var c0 = t0
        while c0 < t1:
            var c1 = min(c0 + chunk, t1)
            var m0 = 0
            while m0 < M:
                var mb = min(M - m0, MB_PASS)
                if mb == 8:
                    _tiles_mb[8, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 7:
                    _tiles_mb[7, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 6:
                    _tiles_mb[6, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 5:
                    _tiles_mb[5, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 4:
                    _tiles_mb[4, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 3:
                    _tiles_mb[3, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                elif mb == 2:
                    _tiles_mb[2, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                else:
                    _tiles_mb[1, WT, SCALED, PACKED](xp, wp, sp, op, m0, K, N, c0, c1)
                m0 += mb
            c0 = c1
        # Ragged tail (N % TILE columns; none in panels): scalar, done by the last thread.
        if not PACKED and tid == nthreads - 1:
            for n in range(nfull * TILE, N):
                for m in range(M):
                    var s = Float32(0)
                    comptime if SCALED:
                        for g in range(K // GROUP):
                            var part = Float32(0)
                            for k in range(g * GROUP, (g + 1) * GROUP):
                                part = wp[unsafe_offset=k * N + n].cast[DType.float32]().fma(
                                    xp[unsafe_offset=m * K + k], part
                                )
                            s = part.fma(sp[unsafe_offset=g * N + n], s)
                    else:
                        for k in range(K):
                            s = wp[unsafe_offset=k * N + n].cast[DType.float32]().fma(
                                xp[unsafe_offset=m * K + k], s
                            )
                    op.unsafe_store(m * N + n, s)

    sync_parallelize(work, nthreads)


@register("fp16_weight_matmul")
struct Fp16WeightMatmul:
    """Computes out[M, N] (f32) = x[M, K] (f32) @ f32(w[K, N] (f16))."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("fp16_weight_matmul: only the CPU target is implemented")
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(1)
        if w.dim_size(0) != K or output.dim_size(0) != M or output.dim_size(1) != N:
            raise Error("fp16_weight_matmul: shape mismatch")
        # No scale: the output pointer stands in for it, never read.
        _cpu_matmul[DType.float16, False, False](
            x.unsafe_ptr(),
            w.unsafe_ptr(),
            output.unsafe_ptr(),
            output.unsafe_ptr(),
            M,
            K,
            N,
        )


@register("int8_weight_matmul")
struct Int8WeightMatmul:
    """Computes out[M, N] (f32) = x[M, K] (f32) @ (f32(w[K, N] (i8)) * scale[k // 64, n])."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.int8, rank=2, ...],
        scale: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("int8_weight_matmul: only the CPU target is implemented")
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(1)
        if (w.dim_size(0) != K or K % GROUP != 0 or scale.dim_size(0) != K // GROUP
                or scale.dim_size(1) != N or output.dim_size(0) != M or output.dim_size(1) != N):
            raise Error("int8_weight_matmul: shape mismatch (K must be a multiple of 64)")
        _cpu_matmul[DType.int8, True, False](
            x.unsafe_ptr(),
            w.unsafe_ptr(),
            scale.unsafe_ptr(),
            output.unsafe_ptr(),
            M,
            K,
            N,
        )


@register("fp16_panel_matmul")
struct Fp16PanelMatmul:
    """Computes out[M, N] (f32) = x[M, K] (f32) @ f32(W) for an fp16 weight packed in panels of 64 columns:
    w[p, k * 64 + c] = W[k, 64p + c], [ceil(N / 64), K * 64], the last panel padded. Each tile reads its
    panel as one sequential stream (the [K, N] layout reads 128 bytes a row, N * 2 bytes apart); the
    products and their order are fp16_weight_matmul's, so the values are too."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("fp16_panel_matmul: only the CPU target is implemented")
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = output.dim_size(1)
        if w.dim_size(0) != ceildiv(N, PANEL) or w.dim_size(1) != K * PANEL or output.dim_size(0) != M:
            raise Error("fp16_panel_matmul: shape mismatch")
        _cpu_matmul[DType.float16, False, True](
            x.unsafe_ptr(),
            w.unsafe_ptr(),
            output.unsafe_ptr(),
            output.unsafe_ptr(),
            M,
            K,
            N,
        )


@register("int8_panel_matmul")
struct Int8PanelMatmul:
    """int8_weight_matmul's product from the int8 weight packed in panels of 64 columns, w [N / 64, K * 64]
    with w[p, k * 64 + c] = W[k, 64p + c] (N a multiple of 64), scale [K / 64, N]: the same values."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.int8, rank=2, ...],
        scale: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("int8_panel_matmul: only the CPU target is implemented")
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = output.dim_size(1)
        if (N % PANEL != 0 or K % GROUP != 0 or w.dim_size(0) != N // PANEL or w.dim_size(1) != K * PANEL
                or scale.dim_size(0) != K // GROUP or scale.dim_size(1) != N or output.dim_size(0) != M):
            raise Error("int8_panel_matmul: shape mismatch (K and N must be multiples of 64)")
        _cpu_matmul[DType.int8, True, True](
            x.unsafe_ptr(),
            w.unsafe_ptr(),
            scale.unsafe_ptr(),
            output.unsafe_ptr(),
            M,
            K,
            N,
        )
