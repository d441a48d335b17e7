"""runtime.inference protocols backed by openai-whisper's torch model (the tests' reference engine).

The decoder session drives `model.decoder` with the kv-cache hooks of `model.install_kv_cache_hooks`
exactly as openai-whisper's own `PyTorchInference` does: the first call runs all initial tokens,
later calls one token per row, and `reorder` permutes the self-attention caches. So the runtime's
decoding loop on top of this double computes the same logits as `whisper.decode` / `transcribe`,
and any difference in their outputs is a difference of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from runtime.inference import ModelDimensions


@dataclass
class TorchAudioFeatures:
    tensor: torch.Tensor  # [batch, n_audio_ctx, n_audio_state]

    @property
    def batch_size(self) -> int:
        return int(self.tensor.shape[0])


class TorchDecoderSession:
    def __init__(self, model, features: torch.Tensor):
        self.model = model
        self.features = features
        self.kv_cache: dict = {}
        blocks = model.decoder.blocks
        self.self_attention_modules = [b.attn.key for b in blocks] + [b.attn.value for b in blocks]
        self.length = 0
        self.prefilled = False

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # the hooks live only for this call, so several sessions can be open at once
        cache, hooks = self.model.install_kv_cache_hooks(self.kv_cache)
        try:
            with torch.no_grad():
                logits = self.model.decoder(tokens, self.features, kv_cache=cache)
        finally:
            for hook in hooks:
                hook.remove()
        self.kv_cache = cache
        return logits

    def prefill(self, tokens: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        if self.prefilled:
            raise RuntimeError("prefill called twice on one session")
        tokens = np.asarray(tokens, dtype=np.int64)
        assert tokens.ndim == 2
        logits = self._forward(torch.from_numpy(tokens))
        self.prefilled = True
        self.length = tokens.shape[1]
        return logits[:, list(positions)].float().numpy()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if not self.prefilled:
            raise RuntimeError("step before prefill")
        tokens = np.asarray(tokens, dtype=np.int64)
        assert tokens.ndim == 1
        logits = self._forward(torch.from_numpy(tokens)[:, None])
        self.length += 1
        return logits[:, -1].float().numpy()

    def reorder(self, source_indices: Sequence[int]) -> None:
        source_indices = list(source_indices)
        if source_indices != list(range(len(source_indices))):
            for module in self.self_attention_modules:
                self.kv_cache[module] = self.kv_cache[module][source_indices].detach()


class TorchInference:
    """An `Inference` over a `whisper.model.Whisper` (fp32 on CPU in the tests)."""

    def __init__(self, model):
        self.model = model.eval()
        self.dims = ModelDimensions(**vars(model.dims))
        # the torch model's own sparse head mask, [layer, head] in its (sorted) order
        self.alignment_heads = model.alignment_heads.indices().T.tolist()
        self.is_multilingual = bool(model.is_multilingual)
        self.num_languages = int(model.num_languages)
        self.n_encode_calls = 0
        self.n_sessions = 0

    def encode(self, mel: np.ndarray) -> TorchAudioFeatures:
        mel = np.asarray(mel, dtype=np.float32)
        assert mel.ndim == 3 and mel.shape[1:] == (self.dims.n_mels, 2 * self.dims.n_audio_ctx), mel.shape
        self.n_encode_calls += 1
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            features = self.model.encoder(torch.from_numpy(mel).to(dtype))
        return TorchAudioFeatures(features)

    def decoder(self, audio_features: TorchAudioFeatures, repeats: int = 1) -> TorchDecoderSession:
        self.n_sessions += 1
        features = audio_features.tensor
        # openai-whisper's decode keeps a single window's features at batch 1 and lets attention
        # broadcast them over the group; do the same, so the numerics are the same
        if repeats > 1 and features.shape[0] > 1:
            features = features.repeat_interleave(repeats, dim=0)
        return TorchDecoderSession(self.model, features)

    def cross_attention_scores(self, audio_features: TorchAudioFeatures, tokens: np.ndarray, heads):
        """As whisper.timing.find_alignment: forward hooks on every cross-attention module collect
        the pre-softmax scores, with SDPA disabled so that the modules compute them."""
        from whisper.model import disable_sdpa

        n_layer = self.dims.n_text_layer
        scores = [None] * n_layer
        hooks = [block.cross_attn.register_forward_hook(
                     lambda _, ins, outs, index=i: scores.__setitem__(index, outs[-1][0]))
                 for i, block in enumerate(self.model.decoder.blocks)]
        try:
            with torch.no_grad(), disable_sdpa():
                tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
                logits = self.model.decoder(tokens, audio_features.tensor)[0]
        finally:
            for hook in hooks:
                hook.remove()
        selected = torch.stack([scores[layer][head] for layer, head in heads])
        return logits.float().numpy(), selected.float().numpy()
