"""Rotary position embeddings (RoFormer, Su et al. 2021), as Hugging Face Llama computes them.

Frequencies follow ``transformers.modeling_rope_utils`` (``_compute_default_rope_parameters``,
``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``), or per-frequency
divisors read from a GGUF file (llama.cpp's ``rope_freqs``); the rotation is the
"rotate_half" (non-interleaved) form of ``transformers.models.llama.modeling_llama.apply_rotary_pos_emb``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from coserve_jax.models.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding.

    Returns:
        float32 array of shape ``[head_dim // 2]`` (radians per position).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.rope_type == "freq_factors":  # llama.cpp's rope_freqs: theta_i = pos * inv_freq_i / f_i
        factors = np.asarray(scaling.freq_factors, np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"{factors.size} RoPE frequency factors for {inv_freq.size} frequencies")
        return (inv_freq / factors).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(config: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables for the given token positions.

    Args:
        positions: int32 ``[T]`` absolute positions.
        dtype: dtype of the returned tables (the activations' dtype, as Hugging Face casts them).
    Returns:
        ``(cos, sin)``, each ``[T, head_dim]`` of ``dtype``; computed in float32 first.
    """
    inv_freq = jnp.asarray(inv_frequencies(config))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` ``[T, H, head_dim]`` by per-token angles (tables ``[T, head_dim]``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
