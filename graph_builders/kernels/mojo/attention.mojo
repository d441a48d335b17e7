# Single-query attention custom op for MAX (CPU path).
#
#   out[r, :] = softmax(scale * q[r, :] @ k_t[r, :, :]) @ v[r, :, :]
#   q [R, 64], k_t [R, 64, M] (keys transposed), v [R, M, 64], out [R, 64]; all f32.
#
# One decoder step attends with a single query per (sequence, head) over the audio's 1500
# positions (cross-attention) or the positions decoded so far (self-attention). MAX's stock
# batched matmul + softmax + matmul spends ~2 ms per sequence on the four cross-attention
# layers of tiny, about 3x the time it takes to read their keys and values once. This kernel
# reads each row's keys and values exactly once, sequentially: pass 1 streams k_t row by row
# (d outer, positions inner) into a scores buffer that stays in L1, pass 2 is the softmax on
# that buffer, pass 3 streams v row by row into 4 zmm accumulators. All arithmetic is fp32:
# the scores are the same sums as the stock matmul's in the same k order (FMA), the softmax is
# normalized before the weighted sum as MAX's is; only summation order within the softmax and
# the final sum differ, at fp32 rounding (~1e-7 relative).
from std.math import ceildiv, exp
from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level
from max.gpu.host import DeviceContext
from extensibility import InputTensor, OutputTensor, register
from extensibility.managed_tensor_slice import _MutableInputTensor as MutableInputTensor

comptime W16 = 16  # fp32 lanes per zmm
comptime HEAD_DIM = 64  # every Whisper model's head width
comptime NVD = HEAD_DIM // W16
comptime MAX_POSITIONS = 2048  # >= n_audio_ctx (1500) and n_text_ctx (448)
comptime NVS = MAX_POSITIONS // W16


@always_inline
def _attend_row(
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    r: Int,
    M: Int,
    scale: Float32,
    capacity: Int,
):
    # Row r's keys are k_t[r, :, :M] and its values v[r, :M, :] in rows of `capacity` positions
    # (= M for tensors that hold exactly M; larger for a cache filled up to M).
    var scores = Array[SIMD[DType.float32, W16], NVS](fill=0)
    var nv = M // W16  # full vectors; the tail (M % 16) is scalar
    var q0 = r * HEAD_DIM
    var k0 = r * HEAD_DIM * capacity
    var v0 = r * capacity * HEAD_DIM

    # pass 1: scores = q @ k_t, summing over d in order (as a matmul's k loop does)
    for d in range(HEAD_DIM):
        var qd = SIMD[DType.float32, W16](qp[unsafe_offset=q0 + d])
        var row = k0 + d * capacity
        for j in range(nv):
            scores[j] = kp.unsafe_load[width=W16](row + j * W16).fma(qd, scores[j])
    var tail = Array[Float32, W16](fill=0)
    for d in range(HEAD_DIM):
        var qd = qp[unsafe_offset=q0 + d]
        var row = k0 + d * capacity
        for m in range(nv * W16, M):
            tail[m - nv * W16] = kp[unsafe_offset=row + m].fma(qd, tail[m - nv * W16])

    # pass 2: softmax over the scaled scores
    var vmax = SIMD[DType.float32, W16](-3.0e38)
    for j in range(nv):
        scores[j] = scores[j] * scale
        vmax = max(vmax, scores[j])
    var smax = vmax.reduce_max()
    for m in range(M - nv * W16):
        tail[m] = tail[m] * scale
        smax = max(smax, tail[m])
    var vsum = SIMD[DType.float32, W16](0)
    for j in range(nv):
        scores[j] = exp(scores[j] - smax)
        vsum += scores[j]
    var total = vsum.reduce_add()
    for m in range(M - nv * W16):
        tail[m] = exp(tail[m] - smax)
        total += tail[m]
    var inv = 1.0 / total
    for j in range(nv):
        scores[j] = scores[j] * inv
    for m in range(M - nv * W16):
        tail[m] = tail[m] * inv

    # pass 3: out = p @ v, positions in order
    var acc = Array[SIMD[DType.float32, W16], NVD](fill=0)
    for j in range(nv):
        var pj = scores[j]
        comptime for lane in range(W16):
            var pm = SIMD[DType.float32, W16](pj[lane])
            var row = v0 + (j * W16 + lane) * HEAD_DIM
            comptime for c in range(NVD):
                acc[c] = vp.unsafe_load[width=W16](row + c * W16).fma(pm, acc[c])
    for m in range(nv * W16, M):
        var pm = SIMD[DType.float32, W16](tail[m - nv * W16])
        var row = v0 + m * HEAD_DIM
        comptime for c in range(NVD):
            acc[c] = vp.unsafe_load[width=W16](row + c * W16).fma(pm, acc[c])
    comptime for c in range(NVD):
        op.unsafe_store(q0 + c * W16, acc[c])


@register("single_query_attention")
struct SingleQueryAttention:
    """Computes out[R, 64] = softmax(scale * q[R, 64] @ k_t[R, 64, M]) @ v[R, M, 64] (f32)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        q: InputTensor[dtype=DType.float32, rank=2, ...],
        k_t: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("single_query_attention: only the CPU target is implemented")
        var R = q.dim_size(0)
        var M = k_t.dim_size(2)
        if q.dim_size(1) != HEAD_DIM or k_t.dim_size(1) != HEAD_DIM or v.dim_size(2) != HEAD_DIM:
            raise Error("single_query_attention: head dim must be 64")
        if k_t.dim_size(0) != R or v.dim_size(0) != R or v.dim_size(1) != M:
            raise Error("single_query_attention: shape mismatch")
        if M > MAX_POSITIONS or M < 1:
            raise Error("single_query_attention: too many positions")
        var scale = Float32(0.125)  # 1 / sqrt(64)
        var qp = q.unsafe_ptr()
        var kp = k_t.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var op = output.unsafe_ptr()
        var nthreads = max(1, min(parallelism_level(None), R))
        var rows_per = ceildiv(R, nthreads)

        def work(tid: Int) raises {var}:
            var r1 = min((tid + 1) * rows_per, R)
            for r in range(tid * rows_per, r1):
                _attend_row(qp, kp, vp, op, r, M, scale, M)

        sync_parallelize(work, nthreads)


# Grouped single-query attention: rows that attend to the same keys and values read them once.
#
#   out[b, h, :] = softmax(scale * q[b, h, :] @ k_t[kv_rows[b], h, :, :]) @ v[kv_rows[b], h, :, :]
#   q [B, H, 64], k_t [G, H, 64, M], v [G, H, M, 64], kv_rows [B] (int64, each in [0, G)), out [B, H, 64]
#
# A decoder step's cross-attention: the beams (or best-of samples) of one audio all attend to that
# audio's keys and values, 18 MB of them per row for tiny and 37 MB for base, so reading them once
# per row made every extra beam cost as much as the weights of the whole step. Here each (audio,
# head) pair is one task: it finds the rows that map to its audio and runs them in groups of up to
# GROUP_MAX, each key and value vector loaded once for the group and used by every row's FMA. Each
# row's arithmetic is exactly _attend_row's (same operations in the same order), so a row's result
# does not depend on which rows it shares its reads with. grouped_query_attention_f16kv is the same
# over fp16 keys and values (the int8 decoder build's), widened to fp32 as they are loaded.
comptime GROUP_MAX = 6  # rows per pass: 6 x 4 zmm accumulators + 4 for v stay in registers


@always_inline
def _attend_group[
    NR: Int, KT: DType
](
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Scalar[KT], MutAnyOrigin],
    vp: Pointer[Scalar[KT], MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    q_rows: Array[Int, GROUP_MAX],
    kv: Int,
    M: Int,
    scale: Float32,
):
    var scores = Array[SIMD[DType.float32, W16], NR * NVS](fill=0)
    var tail = Array[Float32, NR * W16](fill=0)
    var nv = M // W16
    var k0 = kv * HEAD_DIM * M
    var v0 = kv * M * HEAD_DIM

    # pass 1: scores = q @ k_t, summing over d in order; one load of k for every row
    for d in range(HEAD_DIM):
        var qd = Array[SIMD[DType.float32, W16], NR](fill=0)
        comptime for i in range(NR):
            qd[i] = SIMD[DType.float32, W16](qp[unsafe_offset=q_rows[i] * HEAD_DIM + d])
        var row = k0 + d * M
        for j in range(nv):
            var k = kp.unsafe_load[width=W16](row + j * W16).cast[DType.float32]()
            comptime for i in range(NR):
                scores[i * NVS + j] = k.fma(qd[i], scores[i * NVS + j])
    for d in range(HEAD_DIM):
        var row = k0 + d * M
        for m in range(nv * W16, M):
            var k = kp[unsafe_offset=row + m].cast[DType.float32]()
            comptime for i in range(NR):
                var qd = qp[unsafe_offset=q_rows[i] * HEAD_DIM + d]
                tail[i * W16 + m - nv * W16] = k.fma(qd, tail[i * W16 + m - nv * W16])

    # pass 2: softmax over each row's scaled scores (as _attend_row)
    comptime for i in range(NR):
        var s0 = i * NVS
        var t0 = i * W16
        var vmax = SIMD[DType.float32, W16](-3.0e38)
        for j in range(nv):
            scores[s0 + j] = scores[s0 + j] * scale
            vmax = max(vmax, scores[s0 + j])
        var smax = vmax.reduce_max()
        for m in range(M - nv * W16):
            tail[t0 + m] = tail[t0 + m] * scale
            smax = max(smax, tail[t0 + m])
        var vsum = SIMD[DType.float32, W16](0)
        for j in range(nv):
            scores[s0 + j] = exp(scores[s0 + j] - smax)
            vsum += scores[s0 + j]
        var total = vsum.reduce_add()
        for m in range(M - nv * W16):
            tail[t0 + m] = exp(tail[t0 + m] - smax)
            total += tail[t0 + m]
        var inv = 1.0 / total
        for j in range(nv):
            scores[s0 + j] = scores[s0 + j] * inv
        for m in range(M - nv * W16):
            tail[t0 + m] = tail[t0 + m] * inv

    # pass 3: out = p @ v, positions in order; one load of each v vector for every row
    var acc = Array[SIMD[DType.float32, W16], NR * NVD](fill=0)
    for j in range(nv):
        comptime for lane in range(W16):
            var row = v0 + (j * W16 + lane) * HEAD_DIM
            var vv = Array[SIMD[DType.float32, W16], NVD](fill=0)
            comptime for c in range(NVD):
                vv[c] = vp.unsafe_load[width=W16](row + c * W16).cast[DType.float32]()
            comptime for i in range(NR):
                var pm = SIMD[DType.float32, W16](scores[i * NVS + j][lane])
                comptime for c in range(NVD):
                    acc[i * NVD + c] = vv[c].fma(pm, acc[i * NVD + c])
    for m in range(nv * W16, M):
        var row = v0 + m * HEAD_DIM
        comptime for i in range(NR):
            var pm = SIMD[DType.float32, W16](tail[i * W16 + m - nv * W16])
            comptime for c in range(NVD):
                acc[i * NVD + c] = vp.unsafe_load[width=W16](row + c * W16).cast[DType.float32]().fma(
                    pm, acc[i * NVD + c]
                )
    comptime for i in range(NR):
        comptime for c in range(NVD):
            op.unsafe_store(q_rows[i] * HEAD_DIM + c * W16, acc[i * NVD + c])


def _check_grouped(
    q2: Int, k1: Int, k2: Int, v0: Int, v1: Int, v2: Int, v3: Int, r0: Int, B: Int, H: Int, G: Int, M: Int
) raises:
    if q2 != HEAD_DIM or k2 != HEAD_DIM or v3 != HEAD_DIM:
        raise Error("grouped_query_attention: head dim must be 64")
    if k1 != H or v0 != G or v1 != H or v2 != M:
        raise Error("grouped_query_attention: shape mismatch")
    if r0 != B:
        raise Error("grouped_query_attention: kv_rows must have one entry per row")
    if M > MAX_POSITIONS or M < 1:
        raise Error("grouped_query_attention: too many positions")


def _grouped_attention[
    KT: DType
](
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Scalar[KT], MutAnyOrigin],
    vp: Pointer[Scalar[KT], MutAnyOrigin],
    rp: Pointer[Int64, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    B: Int,
    H: Int,
    G: Int,
    M: Int,
) raises:
    for b in range(B):
        var kv_row = Int(rp[unsafe_offset=b])
        if kv_row < 0 or kv_row >= G:
            raise Error("grouped_query_attention: kv_rows out of range")
    var scale = Float32(0.125)  # 1 / sqrt(64)
    var tasks = G * H
    var nthreads = max(1, min(parallelism_level(None), tasks))
    var tasks_per = ceildiv(tasks, nthreads)

    def work(tid: Int) raises {var}:
        for t in range(tid * tasks_per, min((tid + 1) * tasks_per, tasks)):
            var g = t // H
            var h = t % H
            var q_rows = Array[Int, GROUP_MAX](fill=0)
            var n = 0
            for b in range(B + 1):
                if b < B and Int(rp[unsafe_offset=b]) == g:
                    q_rows[n] = b * H + h
                    n += 1
                if n == GROUP_MAX or (b == B and n > 0):
                    var kv = g * H + h
                    if n == 6:
                        _attend_group[6, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    elif n == 5:
                        _attend_group[5, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    elif n == 4:
                        _attend_group[4, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    elif n == 3:
                        _attend_group[3, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    elif n == 2:
                        _attend_group[2, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    else:
                        _attend_group[1, KT](qp, kp, vp, op, q_rows, kv, M, scale)
                    n = 0

    sync_parallelize(work, nthreads)


@register("grouped_query_attention")
struct GroupedQueryAttention:
    """Computes out[b, h] = softmax(scale * q[b, h] @ k_t[kv_rows[b], h]) @ v[kv_rows[b], h] (f32)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k_t: InputTensor[dtype=DType.float32, rank=4, ...],
        v: InputTensor[dtype=DType.float32, rank=4, ...],
        kv_rows: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("grouped_query_attention: only the CPU target is implemented")
        var B = q.dim_size(0)
        var H = q.dim_size(1)
        var G = k_t.dim_size(0)
        var M = k_t.dim_size(3)
        _check_grouped(q.dim_size(2), k_t.dim_size(1), k_t.dim_size(2), v.dim_size(0), v.dim_size(1), v.dim_size(2),
                       v.dim_size(3), kv_rows.dim_size(0), B, H, G, M)
        _grouped_attention[DType.float32](
            q.unsafe_ptr(), k_t.unsafe_ptr(), v.unsafe_ptr(), kv_rows.unsafe_ptr(), output.unsafe_ptr(), B, H, G, M
        )


@register("grouped_query_attention_f16kv")
struct GroupedQueryAttentionF16KV:
    """grouped_query_attention over fp16 keys and values, widened to fp32 as they are read."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k_t: InputTensor[dtype=DType.float16, rank=4, ...],
        v: InputTensor[dtype=DType.float16, rank=4, ...],
        kv_rows: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("grouped_query_attention_f16kv: only the CPU target is implemented")
        var B = q.dim_size(0)
        var H = q.dim_size(1)
        var G = k_t.dim_size(0)
        var M = k_t.dim_size(3)
        _check_grouped(q.dim_size(2), k_t.dim_size(1), k_t.dim_size(2), v.dim_size(0), v.dim_size(1), v.dim_size(2),
                       v.dim_size(3), kv_rows.dim_size(0), B, H, G, M)
        _grouped_attention[DType.float16](
            q.unsafe_ptr(), k_t.unsafe_ptr(), v.unsafe_ptr(), kv_rows.unsafe_ptr(), output.unsafe_ptr(), B, H, G, M
        )


# Self-attention of a decoder step over a cache updated in place.
#
#   k_cache[b, h, :, p] = k[b, h, :]; v_cache[b, h, p, :] = v[b, h, :]   (p = position[b])
#   out[b, h, :] = softmax(scale * q[b, h, :] @ k_cache[b, h, :, :p + 1]) @ v_cache[b, h, :p + 1, :]
#   q, k, v [B, H, 64]; k_cache [B, H, 64, C] (keys transposed), v_cache [B, H, C, 64]; p < C;
#   position int64 [B]: each row its own, so rows of different lengths share a step
#
# Returning the grown cache from the graph (a concat per layer) copied the whole cache every step
# into freshly allocated memory: at 300 positions and 5 beams that copy cost more than the rest of
# tiny's step. Here the new position is written into the caller's buffers and only the positions
# up to it are read, with _attend_row's arithmetic, so the result equals attention over a cache
# that holds exactly p + 1 positions.
@register("cached_query_attention")
struct CachedQueryAttention:
    """Appends one position to each row's cache in place (at that row's own position, so rows of
    different lengths step together) and attends over the row's filled positions."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        output: OutputTensor[dtype=DType.float32, rank=3, ...],
        k_cache: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        v_cache: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        position: InputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target != "cpu":
            raise Error("cached_query_attention: only the CPU target is implemented")
        var B = q.dim_size(0)
        var H = q.dim_size(1)
        var C = k_cache.dim_size(3)
        if q.dim_size(2) != HEAD_DIM or k_cache.dim_size(2) != HEAD_DIM or v_cache.dim_size(3) != HEAD_DIM:
            raise Error("cached_query_attention: head dim must be 64")
        if (k_cache.dim_size(0) != B or k_cache.dim_size(1) != H or v_cache.dim_size(0) != B
                or v_cache.dim_size(1) != H or v_cache.dim_size(2) != C):
            raise Error("cached_query_attention: cache shape mismatch")
        if k.dim_size(0) != B or k.dim_size(1) != H or v.dim_size(0) != B or v.dim_size(1) != H:
            raise Error("cached_query_attention: shape mismatch")
        if position.dim_size(0) != B:
            raise Error("cached_query_attention: one position per row expected")
        var pp = position.unsafe_ptr()
        for b in range(B):
            var at = Int(pp[unsafe_offset=b])
            if at < 0 or at >= C or at >= MAX_POSITIONS:
                raise Error("cached_query_attention: position outside the cache")
        var scale = Float32(0.125)  # 1 / sqrt(64)
        var qp = q.unsafe_ptr()
        var knp = k.unsafe_ptr()
        var vnp = v.unsafe_ptr()
        var kp = k_cache.unsafe_ptr()
        var vp = v_cache.unsafe_ptr()
        var op = output.unsafe_ptr()
        var R = B * H
        var nthreads = max(1, min(parallelism_level(None), R))
        var rows_per = ceildiv(R, nthreads)

        def work(tid: Int) raises {var}:
            var r1 = min((tid + 1) * rows_per, R)
            for r in range(tid * rows_per, r1):
                var p = Int(pp[unsafe_offset=r // H])  # this row's own position
                for d in range(HEAD_DIM):
                    kp.unsafe_store(r * HEAD_DIM * C + d * C + p, knp[unsafe_offset=r * HEAD_DIM + d])
                comptime for c in range(NVD):
                    vp.unsafe_store(r * C * HEAD_DIM + p * HEAD_DIM + c * W16,
                                    vnp.unsafe_load[width=W16](r * HEAD_DIM + c * W16))
                _attend_row(qp, kp, vp, op, r, p + 1, scale, C)

        sync_parallelize(work, nthreads)
