"""The multi-LoRA adapter pool: fixed-shape, zero-padded adapter stacks applied per token.

Every token of a flat batch carries an adapter index: 0 is the base model, ``k`` in
``1..max_loras`` is slot ``k - 1`` of the pool. The pool's arrays never change shape, so loading or
unloading an adapter writes arrays and never recompiles the step (S-LoRA, Sheng et al. 2023;
Punica's BGMV, Chen et al. 2023).

For a linear module ``y = x W`` the pool holds, per decoder layer ``l`` and slot ``s``:

    A[l, s]: [in, max_lora_rank]    (PEFT's ``lora_A.weight`` transposed, columns >= rank are 0)
    B[l, s]: [max_lora_rank, out]   (PEFT's ``lora_B.weight`` transposed, rows >= rank are 0)
    scaling[l, s]: alpha / rank, or alpha / sqrt(rank) with rsLoRA (0 for an empty slot)

and a token ``t`` with adapter ``s`` gets ``y_t += scaling[s] * (x_t A[s]) B[s]`` (PEFT
``lora.Linear.forward``). The per-token selection is a one-hot contraction over slots (BGMV as
an einsum): no Python loop over adapters and no gathered per-token weight copies.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from coserve_jax.models.config import LINEAR_MODULES, ModelConfig


class LoRAScaling(nnx.Variable):
    """Per-(layer, slot) LoRA scaling factors; not trained."""


@dataclasses.dataclass(frozen=True)
class LoRAPoolConfig:
    """Shape of the adapter pool.

    Attributes:
        max_loras: number of adapter slots (adapter indices ``1..max_loras``; 0 is the base model).
        max_lora_rank: rank every slot is padded to; an adapter of higher rank is rejected.
        target_modules: which of ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` the
            pool has stacks for; an adapter may use any subset of these.
    """

    max_loras: int = 4
    max_lora_rank: int = 16
    target_modules: tuple[str, ...] = LINEAR_MODULES

    def __post_init__(self):
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        bad = [m for m in self.target_modules if m not in LINEAR_MODULES]
        if bad:
            raise ValueError(f"unknown LoRA target module(s) {bad}; choose from {list(LINEAR_MODULES)}")
        object.__setattr__(self, "target_modules", tuple(m for m in LINEAR_MODULES if m in self.target_modules))


ParamInit = Callable[[str, tuple[int, ...], jnp.dtype], jax.Array]
"""``(name, shape, dtype) -> array``: how a model's parameters get their first values."""


class LoRAPool(nnx.Module):
    """Adapter stacks for every target module of every layer (see the module docstring).

    Variables (for each module ``m`` in ``config.target_modules``), named ``lora.{m}.A`` etc.:
        ``A[m]``: ``nnx.LoRAParam`` ``[num_layers, max_loras, in, max_lora_rank]`` of ``dtype``;
        ``B[m]``: ``nnx.LoRAParam`` ``[num_layers, max_loras, max_lora_rank, out]`` of ``dtype``;
        ``scaling[m]``: :class:`LoRAScaling` ``[num_layers, max_loras]`` float32.
    """

    def __init__(self, model_config: ModelConfig, config: LoRAPoolConfig, dtype, param_init: ParamInit):
        self.config = config
        L, S, R = model_config.num_layers, config.max_loras, config.max_lora_rank
        self.A = nnx.Dict()
        self.B = nnx.Dict()
        self.scaling = nnx.Dict()
        for m in config.target_modules:
            d_in, d_out = model_config.module_dims(m)
            self.A[m] = nnx.LoRAParam(param_init(f"lora.{m}.A", (L, S, d_in, R), dtype))
            self.B[m] = nnx.LoRAParam(param_init(f"lora.{m}.B", (L, S, R, d_out), dtype))
            self.scaling[m] = LoRAScaling(param_init(f"lora.{m}.scaling", (L, S), jnp.float32))

    def layer_arrays(self) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
        """``{module: (A, B, scaling)}`` with the leading layer axis, for a scan over layers."""
        return {m: (self.A[m][...], self.B[m][...], self.scaling[m][...]) for m in self.config.target_modules}


def adapter_onehot(adapter_ids: jax.Array, max_loras: int, dtype) -> jax.Array:
    """Per-token slot selector.

    Args:
        adapter_ids: int32 ``[T]``, 0 = base model, ``k`` = slot ``k - 1``.
    Returns:
        ``[T, max_loras]`` of ``dtype``; row ``t`` is all zeros for the base model.
    """
    return (adapter_ids[:, None] == jnp.arange(1, max_loras + 1, dtype=adapter_ids.dtype)[None, :]).astype(dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, onehot: jax.Array) -> jax.Array:
    """Per-token LoRA output ``scaling[s_t] * x_t A[s_t] B[s_t]`` (BGMV as two einsums).

    Args:
        x: ``[T, in]`` activations.
        a: ``[S, in, R]``; b: ``[S, R, out]``; scaling: float32 ``[S]``  (one layer's stacks).
        onehot: ``[T, S]`` from :func:`adapter_onehot`.
    Returns:
        ``[T, out]`` in ``x``'s dtype.
    """
    xa = jnp.einsum("ti,sir->tsr", x, a.astype(x.dtype))
    xa = xa * (onehot * scaling[None, :]).astype(x.dtype)[:, :, None]
    return jnp.einsum("tsr,sro->to", xa, b.astype(x.dtype))
