"""Packing sequences into the flat token batch the model runs on (host side, numpy only)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Sequences laid back to back in one flat token array, padded to a fixed length.

    Attributes:
        tokens: int32 ``[T]`` token ids (0 in padding slots).
        positions: int32 ``[T]`` position of each token in its sequence (0 in padding slots).
        segment_ids: int32 ``[T]`` index of each token's sequence; ``-1`` in padding slots.
        adapter_ids: int32 ``[T]`` adapter index of each token (0 = base model).
        offsets: int64 ``[num_seqs + 1]``; sequence ``i`` occupies ``[offsets[i], offsets[i+1])``.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    adapter_ids: np.ndarray
    offsets: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, positions, segment_ids, adapter_ids)``, the arguments of ``CausalLM.__call__``."""
        return self.tokens, self.positions, self.segment_ids, self.adapter_ids

    def unpack(self, per_token: np.ndarray) -> list[np.ndarray]:
        """Split a ``[T, ...]`` result back into one ``[len_i, ...]`` array per sequence."""
        return [per_token[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def pack_sequences(
    sequences: Sequence[Sequence[int]], adapter_ids: Sequence[int] | None = None, pad_to: int | None = None
) -> PackedBatch:
    """Pack token-id sequences into a :class:`PackedBatch`.

    Args:
        sequences: one list of token ids per sequence (each non-empty).
        adapter_ids: one adapter index per sequence (default all 0, the base model).
        pad_to: total slot count ``T`` (default: the total token count).
    Raises:
        ValueError: an empty sequence, a length mismatch, or ``pad_to`` smaller than the tokens.
    """
    if adapter_ids is None:
        adapter_ids = [0] * len(sequences)
    if len(adapter_ids) != len(sequences):
        raise ValueError(f"{len(adapter_ids)} adapter ids for {len(sequences)} sequences")
    lengths = [len(s) for s in sequences]
    if any(n == 0 for n in lengths):
        raise ValueError("empty sequence")
    total = sum(lengths)
    t = total if pad_to is None else pad_to
    if t < total:
        raise ValueError(f"pad_to={pad_to} is smaller than the {total} tokens")
    tokens = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    segments = np.full(t, -1, np.int32)
    adapters = np.zeros(t, np.int32)
    offsets = np.zeros(len(sequences) + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    for i, (seq, a) in enumerate(zip(sequences, adapter_ids)):
        lo, hi = offsets[i], offsets[i + 1]
        tokens[lo:hi] = seq
        positions[lo:hi] = np.arange(hi - lo)
        segments[lo:hi] = i
        adapters[lo:hi] = a
    return PackedBatch(tokens, positions, segments, adapters, offsets)
