"""LoRA dropout that a recomputation reproduces exactly: masks from a counter-based hash.

PEFT's ``lora.Linear`` applies ``nn.Dropout(lora_dropout)`` to a module's input before ``lora_A``
during training: ``y = x W + scaling * dropout(x) A B``. Token-level finetuning computes a
training sequence's forward in chunks across serving steps and recomputes each layer in the
backward, so the mask of (token, layer, module, feature) must be the same every time it is
drawn, whatever batch the token shares. Drawing it from ``jax.random`` keys split per step would
not be; here the mask is a pure function of ``(seed, position, layer, module, feature)``: a 32-bit
integer hash (the ``lowbias32`` mixer, C. Wellons, "Prospecting for hash functions", 2018) of
those counters, turned into a uniform in ``[0, 1)``. Inference tokens carry ``rate = 0``, for
which the mask is exactly 1 (their LoRA input is unchanged bit for bit).

Kept elements are scaled by ``1 / (1 - rate)`` (inverted dropout, as ``torch.nn.Dropout``). When
every token of a batch has rate 0 the hash is not computed at all (a ``lax.cond``): the result is
the same, and a job without dropout pays nothing for it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from coserve_jax.models.config import LINEAR_MODULES


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32: a bijective avalanche mixer on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: jax.Array, position: jax.Array, layer, module: int, features: int, offset=0) -> jax.Array:
    """Uniforms in ``[0, 1)`` of shape ``[T, features]`` (float32) for the given counters.

    Args:
        seed: uint32 ``[T]`` per token (the training sequence's dropout seed).
        position: int32 ``[T]`` the token's position in its sequence.
        layer: int32 scalar; module: index in :data:`LINEAR_MODULES`; features: ``in`` size.
        offset: global index of the first feature (a tensor-parallel shard of the input), so
            that every device draws the mask of its own features of the one global mask.
    """
    u32 = jnp.uint32
    key = _mix(seed.astype(u32) ^ _mix(position.astype(u32) * u32(0x9E3779B9) + u32(module) * u32(0x85EBCA6B)))
    key = _mix(key ^ (jnp.asarray(layer).astype(u32) * u32(0xC2B2AE35) + u32(0x27D4EB2F)))
    feature = jnp.arange(features, dtype=u32) + jnp.asarray(offset).astype(u32)
    bits = _mix(key[:, None] + feature[None, :] * u32(0x165667B1))
    return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


class LoRADropout(NamedTuple):
    """Per-token LoRA dropout settings of a flat batch.

    Attributes:
        rate: float32 ``[T]`` dropout probability per token (0 for inference tokens).
        seed: uint32 ``[T]`` per token.
        position: int32 ``[T]`` per token.
    """

    rate: jax.Array
    seed: jax.Array
    position: jax.Array

    def apply(self, x: jax.Array, layer, module: str, offset=0) -> jax.Array:
        """``dropout(x)`` of module ``module``'s input ``x [T, in]`` at decoder layer ``layer``
        (``x`` holds features ``offset ..`` of the input under tensor parallelism)."""

        def dropped(x):
            u = uniform(self.seed, self.position, layer, LINEAR_MODULES.index(module), x.shape[-1], offset)
            rate = self.rate[:, None]
            keep = u >= rate
            scale = 1.0 / jnp.maximum(1.0 - rate, 1e-6)
            return jnp.where(keep, x * scale.astype(x.dtype), jnp.zeros_like(x))

        # With every rate 0 (inference-only batches, jobs without dropout) the mask is all ones
        # and the hash is skipped: the same values, without its elementwise work.
        return jax.lax.cond(jnp.any(self.rate > 0), dropped, lambda x: x, x)

    def at_layer(self, layer):
        """The callable ``decoder_layer`` takes: ``(x, module, offset) -> dropout(x)`` at ``layer``."""
        return lambda x, module, offset=0: self.apply(x, layer, module, offset)


def constant(n: int, rate, seed) -> LoRADropout:
    """Dropout for one sequence of ``n`` tokens at positions ``0..n-1`` with one rate and seed."""
    return LoRADropout(
        jnp.full((n,), rate, jnp.float32), jnp.full((n,), seed, jnp.uint32), jnp.arange(n, dtype=jnp.int32)
    )
