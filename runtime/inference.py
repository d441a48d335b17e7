"""The seam between the decoding loop and the engine that runs the network.

The decoding loop (runtime/decoding.py, runtime/longform.py) talks to the model only through
these two protocols, so it can be tested against any engine: the MAX artifacts in production
(runtime/engine.py), or openai-whisper's torch model in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class ModelDimensions:
    """Shape numbers of a Whisper model, named as in openai-whisper's checkpoint `dims`."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


class AudioFeatures(Protocol):
    """Encoder output for a batch of 30 s windows, kept wherever the engine keeps it."""

    @property
    def batch_size(self) -> int: ...


class DecoderSession(Protocol):
    """One decoding pass over a batch of sequences, holding its self-attention KV cache.

    Row i of the batch attends to row i of the audio features it was opened with.
    """

    def prefill(self, tokens: np.ndarray, positions: Sequence[int]) -> np.ndarray:
        """Run the decoder over the initial tokens and fill the KV cache.

        tokens: int [batch, n_ctx]; positions: indices into n_ctx whose logits are wanted
        (the runtime asks for the start-of-transcript index, for the no-speech probability,
        and the last index). Returns float32 logits [batch, len(positions), n_vocab].
        """
        ...

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row to the KV cache; tokens int [batch].

        Returns float32 logits [batch, n_vocab] for the appended position.
        """
        ...

    def reorder(self, source_indices: Sequence[int]) -> None:
        """Row i of the cache becomes the old row source_indices[i] (beam search)."""
        ...


class Inference(Protocol):
    """What the decoding loop needs from a loaded model."""

    dims: ModelDimensions
    is_multilingual: bool
    num_languages: int
    # [layer, head] pairs of the cross-attention heads that follow the speech (word timestamps);
    # None: openai-whisper's default, every head of the last half of the decoder layers
    alignment_heads: Optional[Sequence[Sequence[int]]]

    def encode(self, mel: np.ndarray) -> AudioFeatures:
        """mel: float32 [batch, n_mels, 2 * n_audio_ctx] log-mel windows."""
        ...

    def decoder(self, audio_features: AudioFeatures, repeats: int = 1) -> DecoderSession:
        """Open a decoding pass; each audio row serves `repeats` consecutive sequences."""
        ...

    def cross_attention_scores(self, audio_features: AudioFeatures, tokens: np.ndarray,
                               heads: Sequence[Tuple[int, int]]) -> Tuple[np.ndarray, np.ndarray]:
        """One decoder pass over a whole token sequence, for word timestamps.

        audio_features: one window's (batch 1); tokens: int [n]; heads: [layer, head] pairs.
        Returns float32 logits [n, n_vocab] at every position, and float32 cross-attention scores
        [len(heads), n, n_audio_ctx]: q k^T / sqrt(head_dim) before the softmax, as openai-whisper's
        find_alignment captures them.
        """
        ...
