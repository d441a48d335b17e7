"""MAX graphs of Whisper's network, built from `model.json`'s dimensions alone.

Four graphs cover what the decoding loop needs:
- `encoder`: log-mel windows -> audio features.
- `decoder_prefill`: the first decoder pass over a token prefix; computes every layer's
  cross-attention keys and values once, fills the self-attention cache, returns the logits of
  the positions asked for.
- `decoder_step`: one token per row; writes its position into the self-attention cache in place
  and attends over the positions so far (the runtime owns the cache buffers). The
  cross-attention keys and values come once per audio, with the audio row each token row attends
  to (`kv_rows`): the beams of one audio share them, and a reorder across audios only changes the
  map.
- `decoder_alignment`: a whole token sequence in one pass, returning the logits and the
  cross-attention scores of chosen heads (word timestamps, runtime/timing.py).

Caches stay in MAX buffers between calls: the prefill returns its cache, the runtime copies it
into buffers with room for the positions to come, and every step extends them in place (a graph
that returned the grown cache would copy all of it every step). Attention keys are kept
transposed ([batch, head, head_dim, ctx]) so a step multiplies by them without a transpose.

Weights enter as graph weights named after the checkpoint tensors, bound at init from the
safetensors. Each records how it is derived from its tensor (see WeightSpec): linear weights are
stored (in, out), since `x @ W` reads them faster than the transposed (out, in) layout.

Decoding one token is bound by reading the decoder's weights. When every checkpoint tensor is
fp16 (as openai publishes them), the decoder keeps its weights in fp16: on CPU its token-row
matmuls go through a custom kernel that reads fp16 and accumulates in fp32 (kernels/), so the
result is the fp32 product from half the bytes. That kernel reads each weight in panels of 64
outputs, a panel one sequential stream (the token lookup reads the embedding's panels too);
elsewhere the weights are cast to fp32 in the graph. Both compute in fp32 on the checkpoint's
exact values. The encoder keeps fp32 weights.

int8 weights (compiled on request only, CPU, never exact): the weights token rows read (every
decoder linear a token goes through) are int8 with one fp32 scale per 64 input rows of each output
column, read by the int8 kernel in panels as the fp16 ones: a quarter of fp32's bytes, half of
fp16's. The output projection (the token embedding, the largest weight) is int8 on both sides (kernels/, int8_logits: the hidden
states quantized per 64 values, one scale per token, VNNI), and every logit within RESCORE_MARGIN of
its row's best is then recomputed in fp32 from the embedding's own fp16 rows, which the token lookup
reads too. Without that, about 1% of the positions' best tokens change (teacher-forced, base,
lecture-en.flac), nearly all through the output projection; the int8 products move a logit near the
top by 0.49 at most (base; tiny.en 0.34; lecture-en.flac), well inside the margin. The audio's rows
(every encoder linear, and the cross-attention key and value projections of the audio features) are
int8 on both sides: each 64 values of a row quantized in the graph with a scale of their own, the
weights with one scale per output, the products summed exactly in int32 by VNNI, or AMX tiles where the
CPU has them (kernels/, dynamic_int8_matmul: 2.3-3.6x the fp32 matmul on the encoder's shapes). Its encoder
attention takes bf16 AMX tiles where the CPU has them (full_attention_bf16), the fp32 kernel elsewhere.
The cross-attention keys and values every step reads whole are kept in fp16 (the prefill returns
them so).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from max.dtype import DType
from max.graph import BufferType, BufferValue, DeviceRef, Graph, TensorType, TensorValue, Weight, ops

from contracts import STEP_CACHES_AT

from .kernels import (ATTENTION_HEAD_DIM, DYNAMIC_INT8_TILE, INT8_GROUP, KERNELS_PATH, PANEL, cached_query_attention,
                      dynamic_int8_matmul, fp16_panel_matmul, full_attention, grouped_query_attention, int8_logits,
                      int8_panel_matmul, quantize_rows, single_query_attention)

# The int8 build's logits within this much of a row's best are recomputed in fp32 (module docstring):
# two tokens whose int8 logits are further apart than this keep their order.
RESCORE_MARGIN = 2.0

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class WeightSpec:
    """How a graph weight is made from a checkpoint tensor: the manifest's contract with the runtime.

    transform: "none" (as stored), "transpose" (2-D, (out, in) -> (in, out)),
    "conv1d_rscf" ((out, in, k) -> (1, k, in, out), conv2d's filter layout), "panels" (2-D (out, in) ->
    (ceil(out / 64), in * 64): panel p holds value[64p + c, k] at k * 64 + c, outputs past `out` zero;
    fp16_panel_matmul's layout),
    "group_scale" (2-D (out, in) -> (in / 64, out): max |value| / 127 over each 64 inputs of an output,
    the int8 scales of each output column's groups of 64 rows), "output_scale" (2-D (out, in) ->
    (out,): max |value| / 127 over each output's inputs), "vnni_pack" (with "int8": round(value / its
    output's scale), packed in column tiles of 64 for dynamic_int8_matmul: (out / 64, in * 64)).
    The value is cast to `dtype` after the transform ("float32", or "float16": exact for tensors
    stored as fp16, rounded when the user compiled an fp32 checkpoint with 16-bit decoder weights),
    or for "int8" with "panels", quantized: round(value / its group's scale), in panels.
    """

    name: str
    source: str
    transform: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return asdict(self)


class WeightSet:
    """Creates graph weights once per name and records their specs."""

    def __init__(self, device: DeviceRef):
        self.device = device
        self.specs: dict[str, WeightSpec] = {}
        self._weights: dict[str, Weight] = {}

    def get(self, source: str, shape: tuple[int, ...], transform: str = "none", dtype: DType = DType.float32) -> Weight:
        name = source if transform == "none" else f"{source}:{transform}"
        if dtype != DType.float32:
            name = f"{name}@{dtype.name}"
        if name not in self._weights:
            self._weights[name] = Weight(name, dtype, list(shape), device=self.device)
            self.specs[name] = WeightSpec(name, source, transform, tuple(shape), dtype.name)
        return self._weights[name]


@dataclass(frozen=True)
class BuiltGraph:
    name: str
    graph: Graph
    weights: tuple[WeightSpec, ...]


class WhisperGraphs:
    """Builds the graphs for one model's dimensions on one device.

    fp16_weights: the decoder keeps fp16 weights (exact copies when every checkpoint tensor is fp16).
    int8_weights: the decoder's token-row weights are int8 (CPU only; see the module's docstring).
    """

    def __init__(self, dims: dict, device: DeviceRef, fp16_weights: bool = False, int8_weights: bool = False):
        if int8_weights and not device.is_cpu():
            raise ValueError("int8 decoder weights are a CPU option")
        if int8_weights and any(dims[k] % INT8_GROUP for k in ("n_text_state", "n_audio_state")):
            raise ValueError(f"int8 decoder weights need state widths that are multiples of {INT8_GROUP}")
        self.dims = dims
        self.device = device
        self.fp16_weights = fp16_weights
        self.int8_weights = int8_weights
        # the int8 build keeps the cross-attention keys and values the steps read in fp16
        self.cross_dtype = DType.float16 if int8_weights else DType.float32
        # The custom kernels (kernels/) are CPU code: the fp16- and int8-weight matmuls for narrow
        # decoder weights and the int8 build's audio rows, single-query attention for every decoder step,
        # full attention for the encoder's layers.
        self.use_kernels = (fp16_weights or int8_weights) and device.is_cpu()
        self.use_attention_kernel = device.is_cpu() and dims["n_text_state"] // dims["n_text_head"] == ATTENTION_HEAD_DIM
        self.use_full_attention_kernel = (device.is_cpu()
                                          and dims["n_audio_state"] // dims["n_audio_head"] == ATTENTION_HEAD_DIM)
        self._quantized_rows: dict[int, tuple] = {}  # id(x) -> (x, q, scale): one quantize_rows per value

    @property
    def uses_custom_kernels(self) -> bool:
        return self.use_kernels or self.use_attention_kernel or self.use_full_attention_kernel

    def _graph(self, name: str, input_types: list) -> Graph:
        # A graph that calls a custom op must know its kernel library when it is built.
        extensions = [KERNELS_PATH] if self.uses_custom_kernels else []
        return Graph(name, input_types=input_types, custom_extensions=extensions)

    # -- building blocks -------------------------------------------------------------------
    def _matmul(self, w: WeightSet, x: TensorValue, source: str, shape: tuple[int, int], decoder: bool,
                many_rows: bool = False) -> TensorValue:
        """x @ W, W made from `source` transposed to (in, out).

        Decoder weights are fp16 when the checkpoint's are: on CPU the fp16 kernel reads them for
        token rows (a step's one per sequence, a prefill's prompt); for the audio's 1500 rows, and
        on GPU, they are cast to fp32 in the graph, once per window, for the stock matmul.
        With int8 weights, token rows read int8 weights and their column scales instead.
        """
        if decoder and self.int8_weights and not many_rows:
            weight, scale = self._int8_weight(w, source, shape)
            rows = ops.reshape(x, [-1, shape[0]])
            return ops.reshape(int8_panel_matmul(rows, weight, scale), [*x.shape[:-1], shape[1]])
        if not (decoder and self.fp16_weights):
            return x @ w.get(source, shape, "transpose")
        if many_rows or not self.use_kernels:
            return x @ ops.cast(w.get(source, shape, "transpose", DType.float16), DType.float32)
        rows = ops.reshape(x, [-1, shape[0]])
        return ops.reshape(fp16_panel_matmul(rows, self._panels(w, source, shape), shape[1]),
                           [*x.shape[:-1], shape[1]])

    @staticmethod
    def _panels(w: WeightSet, source: str, shape: tuple[int, int]) -> Weight:
        """`source` (out, in) as fp16 panels of PANEL outputs, (ceil(out / PANEL), in * PANEL): what
        fp16_panel_matmul reads, each panel one sequential stream (1.3-2.2x the [in, out] layout's
        speed on base's shapes, the same products)."""
        n_in, n_out = shape
        return w.get(source, (-(-n_out // PANEL), n_in * PANEL), "panels", DType.float16)

    @staticmethod
    def _int8_weight(w: WeightSet, source: str, shape: tuple[int, int]) -> tuple[Weight, Weight]:
        """`source` (out, in) as int8 panels of PANEL outputs (in, out in panels: _panels' layout) and its
        fp32 scales (in / 64, out)."""
        n_in, n_out = shape
        return (w.get(source, (n_out // PANEL, n_in * PANEL), "panels", DType.int8),
                w.get(source, (n_in // INT8_GROUP, n_out), "group_scale"))

    def _linear(self, w: WeightSet, x: TensorValue, prefix: str, n_in: int, n_out: int, bias: bool = True,
                many_rows: bool = False) -> TensorValue:
        if self.int8_weights and (many_rows or not prefix.startswith("decoder")):
            return self._audio_rows_int8_linear(w, x, prefix, n_in, n_out, bias)
        y = self._matmul(w, x, f"{prefix}.weight", (n_in, n_out), prefix.startswith("decoder"), many_rows)
        if bias:
            y = y + w.get(f"{prefix}.bias", (n_out,))
        return y

    def _audio_rows_int8_linear(self, w: WeightSet, x: TensorValue, prefix: str, n_in: int, n_out: int,
                                bias: bool) -> TensorValue:
        """The int8 build's linears over the audio's rows (the encoder's, the cross-attention keys and
        values of the audio features): each 64 values of a row of x quantized to int8 in the graph with
        a scale of their own, times int8 weights with one scale per output, summed exactly in int32
        (VNNI). x is quantized once for every linear that reads it (query, key and value)."""
        rows = ops.reshape(x, [-1, n_in])
        hit = self._quantized_rows.get(id(x))
        if hit is None or hit[0] is not x:
            hit = (x, *quantize_rows(rows, INT8_GROUP))
            self._quantized_rows[id(x)] = hit
        weight, scale = self._vnni_weight(w, f"{prefix}.weight", n_in, n_out)
        offset = (w.get(f"{prefix}.bias", (n_out,)) if bias
                  else ops.constant(np.zeros(n_out, dtype=np.float32), DType.float32, device=self.device))
        return ops.reshape(dynamic_int8_matmul(hit[1], hit[2], weight, scale, offset), [*x.shape[:-1], n_out])

    @staticmethod
    def _vnni_weight(w: WeightSet, source: str, n_in: int, n_out: int) -> tuple[Weight, Weight]:
        """`source` (out, in) as the VNNI ops read it: int8 packed in column tiles of 64 (the last padded
        when n_out is not a multiple of 64), [tiles, in * 64], and one fp32 scale per output, [tiles * 64]."""
        tiles = -(-n_out // DYNAMIC_INT8_TILE)
        return (w.get(source, (tiles, n_in * DYNAMIC_INT8_TILE), "vnni_pack", DType.int8),
                w.get(source, (tiles * DYNAMIC_INT8_TILE,), "output_scale"))

    def _layer_norm(self, w: WeightSet, x: TensorValue, prefix: str, n_state: int) -> TensorValue:
        return ops.layer_norm(x, w.get(f"{prefix}.weight", (n_state,)), w.get(f"{prefix}.bias", (n_state,)), LAYER_NORM_EPS)

    def _mlp(self, w: WeightSet, x: TensorValue, prefix: str, n_state: int) -> TensorValue:
        h = ops.gelu(self._linear(w, x, f"{prefix}.mlp.0", n_state, 4 * n_state), approximate="none")
        return self._linear(w, h, f"{prefix}.mlp.2", 4 * n_state, n_state)

    @staticmethod
    def _split_heads(x: TensorValue, n_head: int, keys: bool = False) -> TensorValue:
        """[batch, ctx, state] -> [batch, head, ctx, head_dim], or [batch, head, head_dim, ctx] for keys."""
        batch, ctx, n_state = x.shape
        x = ops.reshape(x, [batch, ctx, n_head, int(n_state) // n_head])
        return ops.permute(x, [0, 2, 3, 1] if keys else [0, 2, 1, 3])

    @staticmethod
    def _merge_heads(x: TensorValue) -> TensorValue:
        batch, n_head, ctx, head_dim = x.shape
        return ops.reshape(ops.permute(x, [0, 2, 1, 3]), [batch, ctx, int(n_head) * int(head_dim)])

    def _attend(self, q: TensorValue, k_t: TensorValue, v: TensorValue, causal: bool = False) -> TensorValue:
        """softmax(q k^T / sqrt(head_dim)) v, with q [b, h, n, d], k_t [b, h, d, m], v [b, h, m, d]."""
        batch, n_head, n_query, head_dim = q.shape
        if self.use_attention_kernel and str(n_query) == "1" and not causal:
            # One query per row (a decoder step): the kernel reads each row's keys and values once,
            # where the stock batched matmuls cost ~3x that (kernels/mojo/attention.mojo).
            n_rows = batch * n_head
            rows = single_query_attention(ops.reshape(q, [n_rows, head_dim]),
                                          ops.reshape(k_t, [n_rows, head_dim, k_t.shape[3]]),
                                          ops.reshape(v, [n_rows, v.shape[2], head_dim]))
            return ops.reshape(rows, [batch, n_head, n_query, head_dim])
        head_dim = int(head_dim)
        # `scores * scale` in this order is what MAX's fused-attention pattern expects.
        scores = (q @ k_t) * (1.0 / math.sqrt(head_dim))
        if causal:
            # The mask comes from band_part: in MAX 26.7 a where() whose condition compared two
            # ops.range tensors left the scores unmasked inside this graph (checked against numpy).
            # A large finite value, not -inf: exp() makes it exactly 0 all the same, while -inf turns
            # a fully masked block of a blockwise softmax into NaN (-inf minus -inf).
            n = scores.shape[-1]
            ones = ops.broadcast_to(ops.constant(1.0, DType.float32, device=q.device), [n, n])
            lower = ops.cast(ops.band_part(ones, num_lower=None, num_upper=0), DType.bool)
            scores = ops.where(lower, scores, ops.constant(-1e30, DType.float32, device=q.device))
        return ops.softmax(scores) @ v

    def _attend_audio_rows(self, q: TensorValue, k_t: TensorValue, v: TensorValue, kv_rows: TensorValue) -> TensorValue:
        """_attend for one query per row where row b attends to the audio row kv_rows[b]:
        q [b, h, 1, d], k_t [a, h, d, m], v [a, h, m, d], kv_rows int64 [b]."""
        batch, n_head, _, head_dim = q.shape
        if self.use_attention_kernel:
            # Rows of one audio read its keys and values once between them (kernels/mojo/attention.mojo).
            rows = grouped_query_attention(ops.reshape(q, [batch, n_head, head_dim]), k_t, v, kv_rows)
            return ops.reshape(rows, [batch, n_head, 1, head_dim])
        k_t, v = ops.gather(k_t, kv_rows, axis=0), ops.gather(v, kv_rows, axis=0)
        if k_t.dtype != DType.float32:  # the int8 build's fp16 keys and values
            k_t, v = ops.cast(k_t, DType.float32), ops.cast(v, DType.float32)
        return self._attend(q, k_t, v)

    def _self_attention_qkv(self, w: WeightSet, x: TensorValue, prefix: str, n_state: int, n_head: int):
        q = self._split_heads(self._linear(w, x, f"{prefix}.query", n_state, n_state), n_head)
        k_t = self._split_heads(self._linear(w, x, f"{prefix}.key", n_state, n_state, bias=False), n_head, keys=True)
        v = self._split_heads(self._linear(w, x, f"{prefix}.value", n_state, n_state), n_head)
        return q, k_t, v

    def _audio_self_attention(self, w: WeightSet, h: TensorValue, prefix: str, n_state: int, n_head: int) -> TensorValue:
        """An encoder layer's attended values [batch, ctx, state], before the output projection."""
        if self.use_full_attention_kernel:
            # One fused op over the linears' own layout (kernels/mojo/full_attention.mojo): the stock
            # ops' [batch, head, 1500, 1500] scores went through memory three times, and its
            # 64-deep q @ k^T ran at about half a linear's rate (base: 31 -> 21 ms a layer).
            q = self._linear(w, h, f"{prefix}.query", n_state, n_state)
            k = self._linear(w, h, f"{prefix}.key", n_state, n_state, bias=False)
            # The int8 build's products in bf16 AMX tiles where the CPU has them (base: 25 -> 12.5 ms a layer).
            return full_attention(q, k, self._linear(w, h, f"{prefix}.value", n_state, n_state), bf16=self.int8_weights)
        q, k_t, v = self._self_attention_qkv(w, h, prefix, n_state, n_head)
        return self._merge_heads(self._attend(q, k_t, v))

    # -- encoder ---------------------------------------------------------------------------
    def encoder(self) -> BuiltGraph:
        d = self.dims
        n_state, n_head = d["n_audio_state"], d["n_audio_head"]
        w = WeightSet(self.device)
        mel_type = TensorType(DType.float32, ["batch", d["n_mels"], 2 * d["n_audio_ctx"]], device=self.device)
        with self._graph("encoder", [mel_type]) as graph:
            mel = graph.inputs[0].tensor
            # Channels-last with a unit height: conv2d's NHWC layout gives [batch, 1, ctx, state].
            x = ops.unsqueeze(ops.permute(mel, [0, 2, 1]), 1)
            x = ops.conv2d(x, w.get("encoder.conv1.weight", (1, 3, d["n_mels"], n_state), "conv1d_rscf"),
                           padding=(0, 0, 1, 1), bias=w.get("encoder.conv1.bias", (n_state,)))
            x = ops.gelu(x, approximate="none")
            x = ops.conv2d(x, w.get("encoder.conv2.weight", (1, 3, n_state, n_state), "conv1d_rscf"),
                           stride=(1, 2), padding=(0, 0, 1, 1), bias=w.get("encoder.conv2.bias", (n_state,)))
            x = ops.gelu(x, approximate="none")
            x = ops.squeeze(x, 1)
            x = x + w.get("encoder.positional_embedding", (d["n_audio_ctx"], n_state))
            for i in range(d["n_audio_layer"]):
                prefix = f"encoder.blocks.{i}"
                h = self._layer_norm(w, x, f"{prefix}.attn_ln", n_state)
                attended = self._audio_self_attention(w, h, f"{prefix}.attn", n_state, n_head)
                x = x + self._linear(w, attended, f"{prefix}.attn.out", n_state, n_state)
                x = x + self._mlp(w, self._layer_norm(w, x, f"{prefix}.mlp_ln", n_state), prefix, n_state)
            graph.output(self._layer_norm(w, x, "encoder.ln_post", n_state))
        return BuiltGraph("encoder", graph, tuple(w.specs.values()))

    # -- decoder ---------------------------------------------------------------------------
    def _decoder_layers(self, w: WeightSet, x: TensorValue, self_attention, cross_kv, kv_rows: TensorValue | None = None):
        """Runs every decoder block. self_attention(i, prefix, h) returns layer i's attended values
        [batch, n, state] (before the output projection) and the cache tensors it outputs;
        cross_kv[i] is (k_t, v) of the audio: one row per row of x, or with kv_rows one per audio,
        row b of x attending to kv_rows[b]."""
        d = self.dims
        n_state, n_head = d["n_text_state"], d["n_text_head"]
        new_cache = []
        for i in range(d["n_text_layer"]):
            prefix = f"decoder.blocks.{i}"
            attended, cache = self_attention(i, f"{prefix}.attn", self._layer_norm(w, x, f"{prefix}.attn_ln", n_state))
            new_cache += cache
            x = x + self._linear(w, attended, f"{prefix}.attn.out", n_state, n_state)
            h = self._layer_norm(w, x, f"{prefix}.cross_attn_ln", n_state)
            q = self._split_heads(self._linear(w, h, f"{prefix}.cross_attn.query", n_state, n_state), n_head)
            ck_t, cv = cross_kv[i]
            attended = self._attend(q, ck_t, cv) if kv_rows is None else self._attend_audio_rows(q, ck_t, cv, kv_rows)
            x = x + self._linear(w, self._merge_heads(attended), f"{prefix}.cross_attn.out", n_state, n_state)
            x = x + self._mlp(w, self._layer_norm(w, x, f"{prefix}.mlp_ln", n_state), prefix, n_state)
        return self._layer_norm(w, x, "decoder.ln", n_state), new_cache

    def _cached_self_attention(self, w: WeightSet, h: TensorValue, prefix: str, k_cache: BufferValue,
                               v_cache: BufferValue, position: TensorValue, prefix_rows: TensorValue,
                               prefix_lengths: TensorValue) -> TensorValue:
        """A step's self-attention: the new position's key and value are written into the caches
        in place (k_cache [batch, head, head_dim, capacity], v_cache [batch, head, capacity, head_dim])
        at each row's `position` [batch], and the query attends over the row's positions up to it.
        The kernel reads the first prefix_lengths[b] positions of row b from row prefix_rows[b]'s
        cache, once for every row naming it (the same values: decoder_step's docstring).
        Returns [batch, 1, state]."""
        d = self.dims
        n_state, n_head = d["n_text_state"], d["n_text_head"]
        batch, head_dim = h.shape[0], n_state // n_head
        if self.use_attention_kernel:
            heads = [self._linear(w, h, f"{prefix}.query", n_state, n_state),
                     self._linear(w, h, f"{prefix}.key", n_state, n_state, bias=False),
                     self._linear(w, h, f"{prefix}.value", n_state, n_state)]
            q, k, v = (ops.reshape(t, [batch, n_head, head_dim]) for t in heads)
            return ops.reshape(cached_query_attention(k_cache, v_cache, q, k, v, position, prefix_rows, prefix_lengths),
                               [batch, 1, n_state])
        # Stock ops (GPU; head widths the kernel does not take): the whole cache is read, the new
        # position merged in and stored back, and the positions after it masked out; every row reads
        # its own (the prefix inputs only save reads).
        q, k_t, v = self._self_attention_qkv(w, h, prefix, n_state, n_head)
        keys, values = ops.buffer_load(k_cache), ops.buffer_load(v_cache)
        capacity = keys.shape[3]
        slots = ops.range(0, capacity, 1, out_dim=capacity, dtype=DType.int64, device=self.device)
        row_position = ops.reshape(position, [batch, 1, 1, 1])
        here = ops.equal(slots, row_position)  # [batch, 1, 1, capacity]
        keys = ops.where(here, k_t, keys)
        values = ops.where(ops.reshape(here, [batch, 1, capacity, 1]), v, values)
        ops.buffer_store(k_cache, keys)
        ops.buffer_store(v_cache, values)
        scores = (q @ keys) * (1.0 / math.sqrt(head_dim))
        scores = ops.where(ops.greater_equal(row_position, slots), scores,
                           ops.constant(-1e30, DType.float32, device=self.device))
        return self._merge_heads(ops.softmax(scores) @ values)

    def _cross_kv(self, w: WeightSet, audio: TensorValue, prefix: str) -> tuple[TensorValue, TensorValue]:
        """One layer's cross-attention keys (transposed) and values of the audio features."""
        d = self.dims
        n_state, n_head = d["n_text_state"], d["n_text_head"]
        k_t = self._split_heads(self._linear(w, audio, f"{prefix}.key", d["n_audio_state"], n_state, bias=False,
                                             many_rows=True), n_head, keys=True)
        v = self._split_heads(self._linear(w, audio, f"{prefix}.value", d["n_audio_state"], n_state, many_rows=True),
                              n_head)
        return k_t, v

    def _logits(self, w: WeightSet, x: TensorValue) -> TensorValue:
        d = self.dims
        source, n_state, n_vocab = "decoder.token_embedding.weight", d["n_text_state"], d["n_vocab"]
        if self.int8_weights:  # int8 products, those near the best recomputed (module docstring)
            rows = ops.reshape(x, [-1, n_state])
            q, q_scale = quantize_rows(rows, INT8_GROUP)
            packed, scale = self._vnni_weight(w, source, n_state, n_vocab)
            logits = int8_logits(rows, q, q_scale, packed, scale, self._embedding_rows(w), RESCORE_MARGIN)
            return ops.reshape(logits, [*x.shape[:-1], n_vocab])
        # The output projection shares the token embedding; stored (state, vocab) for `x @ W`.
        return self._matmul(w, x, source, (n_state, n_vocab), decoder=True)

    def _embedding_rows(self, w: WeightSet) -> Weight:
        """The int8 build's token embedding as the checkpoint has it, (vocab, state) in fp16."""
        d = self.dims
        return w.get("decoder.token_embedding.weight", (d["n_vocab"], d["n_text_state"]), "none", DType.float16)

    def _embed(self, w: WeightSet, tokens: TensorValue, positions: TensorValue) -> TensorValue:
        d = self.dims
        if self.int8_weights:  # the fp16 rows the logits recompute from: the embedding's own values
            tok = ops.cast(ops.gather(self._embedding_rows(w), tokens, axis=0), DType.float32)
        elif self.fp16_weights and self.use_kernels:
            # The tokens' columns of the output projection's panels (_panels): one copy of the largest
            # weight instead of two (base: 53 MB less). Token t's value k is at element
            # (t // PANEL) * state * PANEL + k * PANEL + t % PANEL of the flattened panels.
            source, n_state = "decoder.token_embedding.weight", d["n_text_state"]
            panels = self._panels(w, source, (n_state, d["n_vocab"]))
            start = (tokens // PANEL) * (n_state * PANEL) + tokens % PANEL  # [batch, n]
            steps = ops.range(0, n_state * PANEL, PANEL, out_dim=n_state, dtype=DType.int64, device=self.device)
            index = ops.unsqueeze(start, -1) + steps  # [batch, n, state]
            tok = ops.cast(ops.gather(ops.reshape(panels, [-1]), index, axis=0), DType.float32)
        else:
            # The tokens' columns of the output projection's (state, vocab) copy of the embedding: one
            # copy of the largest weight instead of two (base: 53 MB less; a gather costs microseconds).
            source, shape = "decoder.token_embedding.weight", (d["n_text_state"], d["n_vocab"])
            table = w.get(source, shape, "transpose", DType.float16 if self.fp16_weights else DType.float32)
            tok = ops.cast(ops.permute(ops.gather(table, tokens, axis=1), [1, 2, 0]), DType.float32)
        pos = ops.gather(w.get("decoder.positional_embedding", (d["n_text_ctx"], d["n_text_state"])), positions, axis=0)
        return tok + pos

    def decoder_prefill(self) -> BuiltGraph:
        """Inputs: tokens int64 [batch, n], logit_positions int64 [p], audio_features [batch, n_audio_ctx, state].
        Outputs: logits [batch, p, vocab], then per layer self k_t, self v, then per layer cross k_t, cross v."""
        d = self.dims
        w = WeightSet(self.device)
        input_types = [
            TensorType(DType.int64, ["batch", "n_tokens"], device=self.device),
            TensorType(DType.int64, ["n_logits"], device=self.device),
            TensorType(DType.float32, ["batch", d["n_audio_ctx"], d["n_audio_state"]], device=self.device),
        ]
        with self._graph("decoder_prefill", input_types) as graph:
            tokens, logit_positions, audio = (v.tensor for v in graph.inputs)
            n = tokens.shape[1]
            positions = ops.range(0, n, 1, out_dim=n, dtype=DType.int64, device=self.device)
            x = self._embed(w, tokens, positions)
            cross = []
            for i in range(d["n_text_layer"]):
                cross.append(self._cross_kv(w, audio, f"decoder.blocks.{i}.cross_attn"))
            def self_attention(i, prefix, h):
                q, k_t, v = self._self_attention_qkv(w, h, prefix, d["n_text_state"], d["n_text_head"])
                return self._merge_heads(self._attend(q, k_t, v, causal=True)), [k_t, v]

            x, cache = self._decoder_layers(w, x, self_attention, cross)
            hidden = ops.gather(x, logit_positions, axis=1)
            cross_out = [t for pair in cross for t in pair]
            if self.cross_dtype != DType.float32:
                cross_out = [ops.cast(t, self.cross_dtype) for t in cross_out]
            graph.output(self._logits(w, hidden), *cache, *cross_out)
        return BuiltGraph("decoder_prefill", graph, tuple(w.specs.values()))

    def decoder_step(self) -> BuiltGraph:
        """Inputs: tokens int64 [batch, 1], position int64 [batch] (each row's own: rows that joined at
        different times step together), kv_rows int64 [batch] (the audio row of each token row),
        prefix_rows and prefix_lengths int64 [batch] (row b's first prefix_lengths[b] cache positions
        hold what row prefix_rows[b]'s do: a position's keys and values are a function of the audio
        and the tokens up to it, so beams of one audio agree where their tokens do; arange and zeros
        claim nothing), then per layer the self-attention caches k_t [batch, head, head_dim, capacity]
        and v [batch, head, capacity, head_dim] as mutable buffers holding each row's positions before
        its `position` (the step writes `position` into them), then per layer cross k_t [n_audio, ...]
        and cross v [n_audio, ...] (as the prefill of the n_audio audio rows returned them).
        Outputs: logits [batch, vocab]."""
        d = self.dims
        n_state, n_head = d["n_text_state"], d["n_text_head"]
        head_dim = n_state // n_head
        n_layer = d["n_text_layer"]
        w = WeightSet(self.device)
        k_type = BufferType(DType.float32, ["batch", n_head, head_dim, "capacity"], device=self.device)
        v_type = BufferType(DType.float32, ["batch", n_head, "capacity", head_dim], device=self.device)
        ck_type = TensorType(self.cross_dtype, ["n_audio", n_head, head_dim, d["n_audio_ctx"]], device=self.device)
        cv_type = TensorType(self.cross_dtype, ["n_audio", n_head, d["n_audio_ctx"], head_dim], device=self.device)
        input_types = [
            TensorType(DType.int64, ["batch", 1], device=self.device),
            TensorType(DType.int64, ["batch"], device=self.device),
            TensorType(DType.int64, ["batch"], device=self.device),
            TensorType(DType.int64, ["batch"], device=self.device),
            TensorType(DType.int64, ["batch"], device=self.device),
            *([k_type, v_type] * n_layer),
            *([ck_type, cv_type] * n_layer),
        ]
        with self._graph("decoder_step", input_types) as graph:
            tokens, position, kv_rows, prefix_rows, prefix_lengths = (v.tensor for v in graph.inputs[:STEP_CACHES_AT])
            caches = [v.buffer for v in graph.inputs[STEP_CACHES_AT:STEP_CACHES_AT + 2 * n_layer]]
            cross_flat = [v.tensor for v in graph.inputs[STEP_CACHES_AT + 2 * n_layer:]]
            cross = [(cross_flat[2 * i], cross_flat[2 * i + 1]) for i in range(n_layer)]
            x = self._embed(w, tokens, ops.reshape(position, [tokens.shape[0], 1]))

            def self_attention(i, prefix, h):
                return self._cached_self_attention(w, h, prefix, caches[2 * i], caches[2 * i + 1], position,
                                                   prefix_rows, prefix_lengths), []

            x, _ = self._decoder_layers(w, x, self_attention, cross, kv_rows=kv_rows)
            graph.output(ops.squeeze(self._logits(w, x), 1))
        return BuiltGraph("decoder_step", graph, tuple(w.specs.values()))

    # -- word alignment ----------------------------------------------------------------------
    @staticmethod
    def _attention_scores(q: TensorValue, k_t: TensorValue) -> TensorValue:
        """q k^T / sqrt(head_dim), before the softmax: what openai-whisper's cross-attention hooks
        capture for word timestamps (find_alignment renormalizes them over the audio's frames)."""
        return (q @ k_t) * (1.0 / math.sqrt(int(q.shape[-1])))

    def _causal(self, scores: TensorValue) -> TensorValue:
        """Masks positions after each row's own (the same band_part mask as _attend's)."""
        n = scores.shape[-1]
        ones = ops.broadcast_to(ops.constant(1.0, DType.float32, device=self.device), [n, n])
        lower = ops.cast(ops.band_part(ones, num_lower=None, num_upper=0), DType.bool)
        return ops.where(lower, scores, ops.constant(-1e30, DType.float32, device=self.device))

    def decoder_alignment(self) -> BuiltGraph:
        """One full decoder pass that also returns cross-attention scores, for word timestamps.

        Inputs: tokens int64 [1, n], heads int64 [k] (flat indices layer * n_text_head + head; the
        runtime picks openai-whisper's alignment heads), audio_features [1, n_audio_ctx, state].
        Outputs: logits [n, vocab] at every position; the selected heads' cross-attention scores
        [k, n, n_audio_ctx] (pre-softmax). Its own layer loop, so that the fast decoding graphs
        need not expose their attention weights.
        """
        d = self.dims
        n_state, n_head, n_ctx = d["n_text_state"], d["n_text_head"], d["n_audio_ctx"]
        w = WeightSet(self.device)
        input_types = [
            TensorType(DType.int64, [1, "n_tokens"], device=self.device),
            TensorType(DType.int64, ["n_heads"], device=self.device),
            TensorType(DType.float32, [1, n_ctx, d["n_audio_state"]], device=self.device),
        ]
        with self._graph("decoder_alignment", input_types) as graph:
            tokens, heads, audio = (v.tensor for v in graph.inputs)
            n = tokens.shape[1]
            positions = ops.range(0, n, 1, out_dim=n, dtype=DType.int64, device=self.device)
            x = self._embed(w, tokens, positions)
            cross_scores = []
            for i in range(d["n_text_layer"]):
                prefix = f"decoder.blocks.{i}"
                h = self._layer_norm(w, x, f"{prefix}.attn_ln", n_state)
                q, k_t, v = self._self_attention_qkv(w, h, f"{prefix}.attn", n_state, n_head)
                attended = ops.softmax(self._causal(self._attention_scores(q, k_t))) @ v
                x = x + self._linear(w, self._merge_heads(attended), f"{prefix}.attn.out", n_state, n_state)
                h = self._layer_norm(w, x, f"{prefix}.cross_attn_ln", n_state)
                q = self._split_heads(self._linear(w, h, f"{prefix}.cross_attn.query", n_state, n_state), n_head)
                ck_t, cv = self._cross_kv(w, audio, f"{prefix}.cross_attn")
                scores = self._attention_scores(q, ck_t)  # [1, head, n, n_audio_ctx]
                cross_scores.append(ops.reshape(scores, [n_head, n, n_ctx]))
                x = x + self._linear(w, self._merge_heads(ops.softmax(scores) @ cv), f"{prefix}.cross_attn.out",
                                     n_state, n_state)
                x = x + self._mlp(w, self._layer_norm(w, x, f"{prefix}.mlp_ln", n_state), prefix, n_state)
            x = self._layer_norm(w, x, "decoder.ln", n_state)
            logits = ops.squeeze(self._logits(w, x), 0)
            graph.output(logits, ops.gather(ops.concat(cross_scores, axis=0), heads, axis=0))
        return BuiltGraph("decoder_alignment", graph, tuple(w.specs.values()))

    def all(self) -> list[BuiltGraph]:
        return [self.encoder(), self.decoder_prefill(), self.decoder_step(), self.decoder_alignment()]
