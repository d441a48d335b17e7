# fp16-weight matmul custom op for MAX (CPU path).
#
#   output[M, N] (f32) = x[M, K] (f32) @ f32(w[K, N] (f16))
#
# Weights are read as fp16 (half the bytes of fp32) and widened to fp32 in
# registers; all products and sums are fp32 (FMA), so the result has fp32
# rounding only.  Work is split over N (column tiles) across the runtime's
# CPU threads; each column tile (64 columns for <= 3 rows of x, 32 otherwise)
# keeps MB x NVT fp32 zmm accumulators live while walking K (sequential
# k-order FMA, bit-identical to MAX's own fp32 matmul on fp32(W)), so every
# weight element is loaded once per MB_MAX=8 rows of x.  Software prefetch of
# the tile PF_DIST ahead matters a lot (M=6: ~7 ms -> ~1.6 ms standalone).
# W layout: [K, N] row-major (same orientation as the fp32 weight today).
from std.math import ceildiv
from std.sys import prefetch
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


@always_inline
def _tile[
    MB: Int, NVT: Int
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Float16, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    m0: Int,
    K: Int,
    N: Int,
    n0: Int,
    do_prefetch: Bool,
):
    var acc = Array[SIMD[DType.float32, W16], MB * NVT](fill=0)
    var pf_off = n0 + PF_DIST * W16 * NVT
    for k in range(K):
        var row = k * N
        if do_prefetch:
            comptime for l in range(NVT // 2):
                prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](
                    wp.unsafe_offset(row + pf_off + l * 32)
                )
        var wv = Array[SIMD[DType.float32, W16], NVT](fill=0)
        comptime for v in range(NVT):
            wv[v] = wp.unsafe_load[width=W16](row + n0 + v * W16).cast[
                DType.float32
            ]()
        comptime for m in range(MB):
            var xb = SIMD[DType.float32, W16](xp[unsafe_offset=(m0 + m) * K + k])
            comptime for v in range(NVT):
                acc[m * NVT + v] = wv[v].fma(xb, acc[m * NVT + v])
    comptime for m in range(MB):
        comptime for v in range(NVT):
            op.unsafe_store((m0 + m) * N + n0 + v * W16, acc[m * NVT + v])


@always_inline
def _tiles_mb[
    MB: Int
](
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Float16, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    m0: Int,
    K: Int,
    N: Int,
    t0: Int,
    t1: Int,
):
    # Wide tiles (more independent FMA chains) for few rows, base tiles else.
    comptime NVT = NV * 2 if MB <= 3 else NV
    comptime STEP = NVT // NV
    var pf_limit = N - (PF_DIST + 1) * W16 * NVT
    var t = t0
    while t + STEP <= t1:
        var n0 = t * TILE
        _tile[MB, NVT](xp, wp, op, m0, K, N, n0, n0 <= pf_limit)
        t += STEP
    while t < t1:
        var n0 = t * TILE
        _tile[MB, NV](xp, wp, op, m0, K, N, n0, n0 <= pf_limit)
        t += 1


def _cpu_matmul(
    xp: Pointer[Float32, MutAnyOrigin],
    wp: Pointer[Float16, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    M: Int,
    K: Int,
    N: Int,
) raises:
    var nfull = N // TILE
    var ntiles = ceildiv(N, TILE)
    var nthreads = max(1, min(parallelism_level(None), ntiles))
    var tiles_per = ceildiv(ntiles, nthreads)

    def work(tid: Int) raises {var}:
        var t0 = tid * tiles_per
        var t1 = min(t0 + tiles_per, nfull)
        var m0 = 0
        while m0 < M:
            var mb = min(M - m0, MB_MAX)
            if t0 < t1:
                if mb == 8:
                    _tiles_mb[8](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 7:
                    _tiles_mb[7](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 6:
                    _tiles_mb[6](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 5:
                    _tiles_mb[5](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 4:
                    _tiles_mb[4](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 3:
                    _tiles_mb[3](xp, wp, op, m0, K, N, t0, t1)
                elif mb == 2:
                    _tiles_mb[2](xp, wp, op, m0, K, N, t0, t1)
                else:
                    _tiles_mb[1](xp, wp, op, m0, K, N, t0, t1)
            m0 += mb
        # Ragged tail (N % TILE columns): scalar, done by the last thread.
        if tid == nthreads - 1:
            for n in range(nfull * TILE, N):
                for m in range(M):
                    var s = Float32(0)
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
        _cpu_matmul(
            x.unsafe_ptr(),
            w.unsafe_ptr(),
            output.unsafe_ptr(),
            M,
            K,
            N,
        )
