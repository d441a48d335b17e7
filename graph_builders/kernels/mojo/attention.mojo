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
from std.memory.alloc import unsafe_alloc
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
# The group's scores live in a scratch buffer of the thread's, updated D_UNROLL key rows at a time:
# held in an Array of vectors indexed at run time (as _attend_row's) they cost several times the
# arithmetic (base, one audio's 5 beams, 8 heads: 0.45 -> 0.29 ms with the keys in cache).
comptime GROUP_MAX = 6  # rows per pass: 6 x 4 zmm accumulators + 4 for v stay in registers
comptime D_UNROLL = 4  # key rows per pass over the scores: GROUP_MAX x 4 q broadcasts stay in registers


@always_inline
def _softmax_scores(sp: Pointer[Float32, MutAnyOrigin], s0: Int, n: Int, scale: Float32):
    """softmax(scale * scores) in place over sp[s0:s0 + n], with _attend_row's operations in its
    order: the full vectors, then the tail one by one."""
    var nv = n // W16
    var vmax = SIMD[DType.float32, W16](-3.0e38)
    for j in range(nv):
        var s = sp.unsafe_load[width=W16](s0 + j * W16) * scale
        sp.unsafe_store(s0 + j * W16, s)
        vmax = max(vmax, s)
    var smax = vmax.reduce_max()
    for m in range(nv * W16, n):
        var s = sp[unsafe_offset=s0 + m] * scale
        sp.unsafe_store(s0 + m, s)
        smax = max(smax, s)
    var vsum = SIMD[DType.float32, W16](0)
    for j in range(nv):
        var e = exp(sp.unsafe_load[width=W16](s0 + j * W16) - smax)
        sp.unsafe_store(s0 + j * W16, e)
        vsum += e
    var total = vsum.reduce_add()
    for m in range(nv * W16, n):
        var e = exp(sp[unsafe_offset=s0 + m] - smax)
        sp.unsafe_store(s0 + m, e)
        total += e
    var inv = 1.0 / total
    for j in range(nv):
        sp.unsafe_store(s0 + j * W16, sp.unsafe_load[width=W16](s0 + j * W16) * inv)
    for m in range(nv * W16, n):
        sp.unsafe_store(s0 + m, sp[unsafe_offset=s0 + m] * inv)


@always_inline
def _spare_into_place(sp: Pointer[Float32, MutAnyOrigin], s0: Int, n: Int, spare: Int):
    """Moves the scores of positions n // 16 * 16 .. n - 1 (n not a multiple of 16, at least 16)
    from the last lanes of the spare vector at sp[spare], which holds positions n - 16 .. n - 1,
    to their places after the full vectors at sp[s0]."""
    var nv = n // W16
    var rem = n - nv * W16
    for t in range(rem):
        sp.unsafe_store(s0 + nv * W16 + t, sp[unsafe_offset=spare + W16 - rem + t])


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
    sp: Pointer[Float32, MutAnyOrigin],
):
    # sp: the group's scores, row i at sp[i * ms], ms = (M // 16 + 1) * 16 (a spare vector past the
    # full ones for the last, overlapping one)
    var nv = M // W16
    var rem = M - nv * W16
    var ms = (nv + 1) * W16
    var k0 = kv * HEAD_DIM * M
    var v0 = kv * M * HEAD_DIM
    comptime for i in range(NR):
        for j in range(nv + 1):
            sp.unsafe_store(i * ms + j * W16, SIMD[DType.float32, W16](0))

    # pass 1: scores = q @ k_t, summing over d in order, D_UNROLL key rows at a time (each score is
    # loaded and stored once per D_UNROLL FMAs; k is read once for every row of the group)
    for d0 in range(0, HEAD_DIM, D_UNROLL):
        var qd = Array[SIMD[DType.float32, W16], NR * D_UNROLL](fill=0)
        comptime for i in range(NR):
            comptime for u in range(D_UNROLL):
                qd[i * D_UNROLL + u] = SIMD[DType.float32, W16](qp[unsafe_offset=q_rows[i] * HEAD_DIM + d0 + u])
        var row = k0 + d0 * M
        # the full vectors, then (where M is not a multiple of 16) the last 16 keys into the spare vector
        var last = nv + 1 if rem > 0 and nv > 0 else nv
        for j in range(last):
            var at = j * W16 if j < nv else M - W16
            var k = Array[SIMD[DType.float32, W16], D_UNROLL](fill=0)
            comptime for u in range(D_UNROLL):
                k[u] = kp.unsafe_load[width=W16](row + u * M + at).cast[DType.float32]()
            comptime for i in range(NR):
                var s = sp.unsafe_load[width=W16](i * ms + j * W16)
                comptime for u in range(D_UNROLL):
                    s = k[u].fma(qd[i * D_UNROLL + u], s)
                sp.unsafe_store(i * ms + j * W16, s)
    if rem > 0:
        if nv > 0:  # the spare vector is the one after the full ones
            comptime for i in range(NR):
                _spare_into_place(sp, i * ms, M, i * ms + nv * W16)
        else:  # fewer than 16 keys: one at a time
            for d in range(HEAD_DIM):
                var row = k0 + d * M
                for m in range(M):
                    var k = kp[unsafe_offset=row + m].cast[DType.float32]()
                    comptime for i in range(NR):
                        var qd = qp[unsafe_offset=q_rows[i] * HEAD_DIM + d]
                        sp.unsafe_store(i * ms + m, k.fma(qd, sp[unsafe_offset=i * ms + m]))

    # pass 2: softmax over each row's scaled scores
    comptime for i in range(NR):
        _softmax_scores(sp, i * ms, M, scale)

    # pass 3: out = p @ v, positions in order; one load of each v vector for every row
    var acc = Array[SIMD[DType.float32, W16], NR * NVD](fill=0)
    for m in range(M):
        var row = v0 + m * HEAD_DIM
        var vv = Array[SIMD[DType.float32, W16], NVD](fill=0)
        comptime for c in range(NVD):
            vv[c] = vp.unsafe_load[width=W16](row + c * W16).cast[DType.float32]()
        comptime for i in range(NR):
            var pm = SIMD[DType.float32, W16](sp[unsafe_offset=i * ms + m])
            comptime for c in range(NVD):
                acc[i * NVD + c] = vv[c].fma(pm, acc[i * NVD + c])
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

    var ms = (M // W16 + 1) * W16

    def work(tid: Int) raises {var}:
        var sp_mem = unsafe_alloc[Float32](GROUP_MAX * ms, alignment=64)
        var sp = sp_mem.unsafe_origin_cast[MutAnyOrigin]()
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
                        _attend_group[6, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    elif n == 5:
                        _attend_group[5, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    elif n == 4:
                        _attend_group[4, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    elif n == 3:
                        _attend_group[3, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    elif n == 2:
                        _attend_group[2, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    else:
                        _attend_group[1, KT](qp, kp, vp, op, q_rows, kv, M, scale, sp)
                    n = 0
        sp_mem.unsafe_free()

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


# Self-attention of a decoder step over a cache updated in place, reading a shared prefix once.
#
#   k_cache[b, h, :, p] = k[b, h, :]; v_cache[b, h, p, :] = v[b, h, :]   (p = position[b])
#   out[b, h, :] = softmax(scale * q[b, h, :] @ k_cache[b, h, :, :p + 1]) @ v_cache[b, h, :p + 1, :]
#   q, k, v [B, H, 64]; k_cache [B, H, 64, C] (keys transposed), v_cache [B, H, C, 64]; p < C;
#   position int64 [B]: each row its own, so rows of different lengths share a step;
#   prefix_rows, prefix_lengths int64 [B]: row b's first prefix_lengths[b] positions hold the same
#   keys and values as row prefix_rows[b]'s (the caller's promise: the same audio and tokens there)
#
# Returning the grown cache from the graph (a concat per layer) copied the whole cache every step
# into freshly allocated memory: at 300 positions and 5 beams that copy cost more than the rest of
# tiny's step. Here the new position is written into the caller's buffers and only the positions
# up to it are read. The beams of one audio share most of their positions (the prompt, and the
# tokens before they parted): the rows that name one prefix row are attended together, up to GROUP_MAX
# at a time, their shared positions read once from the prefix row's cache for all of them (as
# _attend_group reads an audio's cross-attention keys), the rest from each row's own. Each row's
# arithmetic is _attend_row's over its own p + 1 positions (the same operations in the same order),
# so the result does not depend on which rows share reads.
@always_inline
def _cached_group[
    NR: Int
](
    qp: Pointer[Float32, MutAnyOrigin],
    kp: Pointer[Float32, MutAnyOrigin],
    vp: Pointer[Float32, MutAnyOrigin],
    op: Pointer[Float32, MutAnyOrigin],
    q_rows: Array[Int, GROUP_MAX],
    lengths: Array[Int, GROUP_MAX],
    lead: Int,
    shared: Int,
    C: Int,
    scale: Float32,
    sp: Pointer[Float32, MutAnyOrigin],
    ms: Int,
):
    # q_rows[i]: the (row, head) index of the group's i-th row, lengths[i] its positions to attend
    # (p + 1); lead: the prefix row's (row, head) index; shared: positions (a multiple of 16, at
    # most every row's shared prefix) read from the prefix row. sp: NR rows of ms scores, the last
    # vector of each a spare one.
    var ns = shared // W16
    comptime for i in range(NR):
        for j in range(ms // W16):
            sp.unsafe_store(i * ms + j * W16, SIMD[DType.float32, W16](0))

    # pass 1: scores = q @ k_t, summing over d in order, D_UNROLL key rows at a time; the shared
    # positions' keys once for the group, then each row's own
    for d0 in range(0, HEAD_DIM, D_UNROLL):
        var qd = Array[SIMD[DType.float32, W16], NR * D_UNROLL](fill=0)
        comptime for i in range(NR):
            comptime for u in range(D_UNROLL):
                qd[i * D_UNROLL + u] = SIMD[DType.float32, W16](qp[unsafe_offset=q_rows[i] * HEAD_DIM + d0 + u])
        var row = lead * HEAD_DIM * C + d0 * C
        for j in range(ns):
            var k = Array[SIMD[DType.float32, W16], D_UNROLL](fill=0)
            comptime for u in range(D_UNROLL):
                k[u] = kp.unsafe_load[width=W16](row + u * C + j * W16)
            comptime for i in range(NR):
                var s = sp.unsafe_load[width=W16](i * ms + j * W16)
                comptime for u in range(D_UNROLL):
                    s = k[u].fma(qd[i * D_UNROLL + u], s)
                sp.unsafe_store(i * ms + j * W16, s)
        comptime for i in range(NR):
            var own = q_rows[i] * HEAD_DIM * C + d0 * C
            var n = lengths[i]
            var nv = n // W16
            # the full vectors past the shared ones, then (n not a multiple of 16) the last 16
            # positions into the spare vector
            var last = nv + 1 if n % W16 != 0 and nv > 0 else nv
            for j in range(ns, last):
                var at = j * W16 if j < nv else n - W16
                var slot = i * ms + (j * W16 if j < nv else ms - W16)
                var s = sp.unsafe_load[width=W16](slot)
                comptime for u in range(D_UNROLL):
                    s = kp.unsafe_load[width=W16](own + u * C + at).fma(qd[i * D_UNROLL + u], s)
                sp.unsafe_store(slot, s)
    comptime for i in range(NR):
        var n = lengths[i]
        var nv = n // W16
        var rem = n - nv * W16
        if rem > 0:
            if nv > 0:  # the spare vector is the row's last
                _spare_into_place(sp, i * ms, n, i * ms + ms - W16)
            else:  # fewer than 16 positions: one at a time
                for d in range(HEAD_DIM):
                    var qd = qp[unsafe_offset=q_rows[i] * HEAD_DIM + d]
                    var own = q_rows[i] * HEAD_DIM * C + d * C
                    for m in range(n):
                        sp.unsafe_store(i * ms + m, kp[unsafe_offset=own + m].fma(qd, sp[unsafe_offset=i * ms + m]))

    # pass 2: softmax over each row's scaled scores
    comptime for i in range(NR):
        _softmax_scores(sp, i * ms, lengths[i], scale)

    # pass 3: out = p @ v, positions in order: the shared ones' values once for the group, then each row's own
    var acc = Array[SIMD[DType.float32, W16], NR * NVD](fill=0)
    for m in range(shared):
        var row = lead * C * HEAD_DIM + m * HEAD_DIM
        var vv = Array[SIMD[DType.float32, W16], NVD](fill=0)
        comptime for c in range(NVD):
            vv[c] = vp.unsafe_load[width=W16](row + c * W16)
        comptime for i in range(NR):
            var pm = SIMD[DType.float32, W16](sp[unsafe_offset=i * ms + m])
            comptime for c in range(NVD):
                acc[i * NVD + c] = vv[c].fma(pm, acc[i * NVD + c])
    comptime for i in range(NR):
        var own = q_rows[i] * C * HEAD_DIM
        var row_acc = Array[SIMD[DType.float32, W16], NVD](fill=0)
        comptime for c in range(NVD):
            row_acc[c] = acc[i * NVD + c]
        for m in range(shared, lengths[i]):
            var pm = SIMD[DType.float32, W16](sp[unsafe_offset=i * ms + m])
            comptime for c in range(NVD):
                row_acc[c] = vp.unsafe_load[width=W16](own + m * HEAD_DIM + c * W16).fma(pm, row_acc[c])
        comptime for c in range(NVD):
            op.unsafe_store(q_rows[i] * HEAD_DIM + c * W16, row_acc[c])


@register("cached_query_attention")
struct CachedQueryAttention:
    """Appends one position to each row's cache in place (at that row's own position, so rows of
    different lengths step together) and attends over the row's filled positions, reading the
    positions rows share with their prefix row once for all of them."""

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
        prefix_rows: InputTensor[dtype=DType.int64, rank=1, ...],
        prefix_lengths: InputTensor[dtype=DType.int64, rank=1, ...],
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
        if position.dim_size(0) != B or prefix_rows.dim_size(0) != B or prefix_lengths.dim_size(0) != B:
            raise Error("cached_query_attention: one position, prefix row and prefix length per row expected")
        var pp = position.unsafe_ptr()
        var lp = prefix_rows.unsafe_ptr()
        var sl = prefix_lengths.unsafe_ptr()
        var longest = 0
        for b in range(B):
            var at = Int(pp[unsafe_offset=b])
            if at < 0 or at >= C or at >= MAX_POSITIONS:
                raise Error("cached_query_attention: position outside the cache")
            longest = max(longest, at + 1)
        for b in range(B):
            var lead = Int(lp[unsafe_offset=b])
            if lead < 0 or lead >= B:
                raise Error("cached_query_attention: prefix row out of range")
            var shared = Int(sl[unsafe_offset=b])
            # the prefix row's shared positions are ones it held before this step
            if shared < 0 or shared > Int(pp[unsafe_offset=b]) or shared > Int(pp[unsafe_offset=lead]):
                raise Error("cached_query_attention: prefix length beyond the rows' positions")
        var scale = Float32(0.125)  # 1 / sqrt(64)
        var qp = q.unsafe_ptr()
        var knp = k.unsafe_ptr()
        var vnp = v.unsafe_ptr()
        var kp = k_cache.unsafe_ptr()
        var vp = v_cache.unsafe_ptr()
        var op = output.unsafe_ptr()
        var ms = (longest // W16 + 2) * W16  # a row's scores and a spare vector
        var tasks = B * H  # (prefix row, head): the rows naming that prefix row, at that head
        var nthreads = max(1, min(parallelism_level(None), tasks))

        def work(tid: Int) raises {var}:
            var sp_mem = unsafe_alloc[Float32](GROUP_MAX * ms, alignment=64)
            var sp = sp_mem.unsafe_origin_cast[MutAnyOrigin]()
            # interleaved: the heads of one prefix row go to every thread
            for t in range(tid, tasks, nthreads):
                var g = t // H
                var h = t % H
                var q_rows = Array[Int, GROUP_MAX](fill=0)
                var lengths = Array[Int, GROUP_MAX](fill=0)
                var n = 0
                var shared = MAX_POSITIONS
                for b in range(B + 1):
                    if b < B and Int(lp[unsafe_offset=b]) == g:
                        var r = b * H + h
                        var p = Int(pp[unsafe_offset=b])
                        for d in range(HEAD_DIM):
                            kp.unsafe_store(r * HEAD_DIM * C + d * C + p, knp[unsafe_offset=r * HEAD_DIM + d])
                        comptime for c in range(NVD):
                            vp.unsafe_store(r * C * HEAD_DIM + p * HEAD_DIM + c * W16,
                                            vnp.unsafe_load[width=W16](r * HEAD_DIM + c * W16))
                        q_rows[n] = r
                        lengths[n] = p + 1
                        shared = min(shared, Int(sl[unsafe_offset=b]))
                        n += 1
                    if n == GROUP_MAX or (b == B and n > 0):
                        var lead = g * H + h
                        var aligned = (shared // W16) * W16
                        if n == 6:
                            _cached_group[6](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        elif n == 5:
                            _cached_group[5](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        elif n == 4:
                            _cached_group[4](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        elif n == 3:
                            _cached_group[3](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        elif n == 2:
                            _cached_group[2](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        else:
                            _cached_group[1](qp, kp, vp, op, q_rows, lengths, lead, aligned, C, scale, sp, ms)
                        n = 0
                        shared = MAX_POSITIONS
            sp_mem.unsafe_free()

        sync_parallelize(work, nthreads)
