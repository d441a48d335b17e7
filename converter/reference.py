"""An independent numpy forward pass of Whisper, built from the safetensors alone.

The validate stage runs it beside openai-whisper's torch model on the same inputs: agreement shows
the extracted tensors, names and layouts are what the network needs, before any graph is built.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu(x):
    import torch  # only for erf: numpy has none, and the converter has torch anyway

    return 0.5 * x * (1.0 + torch.special.erf(torch.from_numpy(x / np.sqrt(2.0))).numpy())


def _conv1d(x, w, b, stride):
    """x [ch_in, t], w [ch_out, ch_in, 3], padding 1."""
    padded = np.pad(x, ((0, 0), (1, 1)))
    n_out = (x.shape[1] + 2 - 3) // stride + 1
    cols = np.stack([padded[:, k: k + stride * n_out: stride] for k in range(3)], axis=1)  # [ch_in, 3, t]
    return np.einsum("oik,ikt->ot", w, cols) + b[:, None]


class _Float64(Mapping):
    """Weights cast to float64 when read, one tensor at a time: large-v3's 1.5 billion weights would
    take 12 GB in float64 at once."""

    def __init__(self, weights: Mapping):
        self._weights = weights

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self._weights[name], dtype=np.float64)

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


class NumpyWhisper:
    def __init__(self, weights: Mapping[str, np.ndarray], dims: dict):
        self.w = _Float64(weights)
        self.dims = dims

    def _attention(self, prefix, x, source, n_head, causal):
        w = self.w
        q = x @ w[f"{prefix}.query.weight"].T + w[f"{prefix}.query.bias"]
        k = source @ w[f"{prefix}.key.weight"].T
        v = source @ w[f"{prefix}.value.weight"].T + w[f"{prefix}.value.bias"]
        n, m, d = q.shape[0], k.shape[0], q.shape[1] // n_head
        q, k, v = (a.reshape(a.shape[0], n_head, d).transpose(1, 0, 2) for a in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        if causal:
            scores = scores + np.triu(np.full((n, m), -np.inf), 1)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out = (scores / scores.sum(-1, keepdims=True)) @ v
        out = out.transpose(1, 0, 2).reshape(n, n_head * d)
        return out @ w[f"{prefix}.out.weight"].T + w[f"{prefix}.out.bias"]

    def _mlp(self, prefix, x):
        w = self.w
        h = _gelu(x @ w[f"{prefix}.mlp.0.weight"].T + w[f"{prefix}.mlp.0.bias"])
        return h @ w[f"{prefix}.mlp.2.weight"].T + w[f"{prefix}.mlp.2.bias"]

    def _ln(self, prefix, x):
        return _layer_norm(x, self.w[f"{prefix}.weight"], self.w[f"{prefix}.bias"])

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """mel [n_mels, 2 * n_audio_ctx] -> audio features [n_audio_ctx, n_audio_state]."""
        w, d = self.w, self.dims
        x = _gelu(_conv1d(mel.astype(np.float64), w["encoder.conv1.weight"], w["encoder.conv1.bias"], 1))
        x = _gelu(_conv1d(x, w["encoder.conv2.weight"], w["encoder.conv2.bias"], 2)).T
        x = x + w["encoder.positional_embedding"]
        for i in range(d["n_audio_layer"]):
            p = f"encoder.blocks.{i}"
            h = self._ln(f"{p}.attn_ln", x)
            x = x + self._attention(f"{p}.attn", h, h, d["n_audio_head"], causal=False)
            x = x + self._mlp(p, self._ln(f"{p}.mlp_ln", x))
        return self._ln("encoder.ln_post", x)

    def logits(self, tokens: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """tokens [n] int, audio [n_audio_ctx, state] -> logits [n, n_vocab]."""
        w, d = self.w, self.dims
        x = w["decoder.token_embedding.weight"][tokens] + w["decoder.positional_embedding"][: len(tokens)]
        for i in range(d["n_text_layer"]):
            p = f"decoder.blocks.{i}"
            h = self._ln(f"{p}.attn_ln", x)
            x = x + self._attention(f"{p}.attn", h, h, d["n_text_head"], causal=True)
            x = x + self._attention(f"{p}.cross_attn", self._ln(f"{p}.cross_attn_ln", x), audio, d["n_text_head"], causal=False)
            x = x + self._mlp(p, self._ln(f"{p}.mlp_ln", x))
        return self._ln("decoder.ln", x) @ w["decoder.token_embedding.weight"].T
