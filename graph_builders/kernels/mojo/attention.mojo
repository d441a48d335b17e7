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
):
    var scores = Array[SIMD[DType.float32, W16], NVS](fill=0)
    var nv = M // W16  # full vectors; the tail (M % 16) is scalar
    var q0 = r * HEAD_DIM
    var k0 = r * HEAD_DIM * M
    var v0 = r * M * HEAD_DIM

    # pass 1: scores = q @ k_t, summing over d in order (as a matmul's k loop does)
    for d in range(HEAD_DIM):
        var qd = SIMD[DType.float32, W16](qp[unsafe_offset=q0 + d])
        var row = k0 + d * M
        for j in range(nv):
            scores[j] = kp.unsafe_load[width=W16](row + j * W16).fma(qd, scores[j])
    var tail = Array[Float32, W16](fill=0)
    for d in range(HEAD_DIM):
        var qd = qp[unsafe_offset=q0 + d]
        var row = k0 + d * M
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
                _attend_row(qp, kp, vp, op, r, M, scale)

        sync_parallelize(work, nthreads)
