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
``lora.Linear.forward``). Two ways to select each token's adapter:

* **Segmented** (:func:`lora_segments`, :func:`segmented_lora_delta`; the serving step's path):
  the step's tokens are sorted by adapter, the adapters present form at most ``G`` groups
  (the engine's ``max_loras_per_batch``), and each LoRA matmul is one grouped GEMM
  (``jax.lax.ragged_dot``) over those groups' weights only. Base-model tokens sort last, outside
  every group: a grouped-GEMM backend does no LoRA work for them, and the work never depends on
  ``max_loras`` (Punica's SGMV, Chen et al. 2023; SGLang's chunked SGMV; Loquetier's segmented
  kernel). Where XLA expands a grouped GEMM into a dense one (its CPU backend), the cost is ``G``
  times one adapter's.
* **One-hot** (:func:`adapter_onehot`, :func:`lora_delta`; the reference): a one-hot
  contraction over all slots (BGMV as an einsum), whose work and weight reads grow with
  ``max_loras``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

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


class LoRASegments(NamedTuple):
    """A step's tokens grouped by adapter, for :func:`segmented_lora_delta` (from :func:`lora_segments`).

    Attributes:
        order: int32 ``[T]``: token slots sorted by adapter slot (stable), base-model tokens last.
        inverse: int32 ``[T]``: where each token slot sits in ``order``.
        slots: int32 ``[G]``: the pool slot (0-based) of each group, ascending; unused groups 0.
        sizes: int32 ``[G]``: tokens of each group (0 for an unused group); group ``g`` holds rows
            ``sum(sizes[:g]) .. sum(sizes[:g+1])`` of ``order``.
    """

    order: jax.Array
    inverse: jax.Array
    slots: jax.Array
    sizes: jax.Array


def lora_segments(adapter_ids: jax.Array, max_loras: int, num_groups: int) -> LoRASegments:
    """Group a step's tokens by adapter (on the device: a sort and a histogram of ``[T]`` ints).

    Args:
        adapter_ids: int32 ``[T]``, 0 = base model, ``k`` = slot ``k - 1``.
        max_loras: the pool's slots.
        num_groups: ``G``, the most distinct adapters a step may hold. The scheduler keeps every
            step within it; the adapters past the first ``G`` (by slot) of a step that held more
            would get no LoRA contribution.
    Returns:
        :class:`LoRASegments`.
    """
    t = adapter_ids.shape[0]
    key = jnp.where(adapter_ids > 0, adapter_ids, max_loras + 1)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((t,), jnp.int32).at[order].set(jnp.arange(t, dtype=jnp.int32))
    counts = jnp.zeros((max_loras + 1,), jnp.int32).at[adapter_ids].add(1, mode="drop")[1:]
    (slots,) = jnp.nonzero(counts, size=num_groups, fill_value=0)
    slots = slots.astype(jnp.int32)
    present = jnp.arange(num_groups) < jnp.count_nonzero(counts)
    sizes = jnp.where(present, counts[slots], 0).astype(jnp.int32)
    return LoRASegments(order, inverse, slots, sizes)


def group_stacks(stacks: dict, seg: LoRASegments, axis: int = 1) -> dict:
    """The step's groups' slices of the pool: ``{m: (A, B, scaling)}`` with the slot axis ``axis``
    (1 for the ``[L, S, ...]`` stacks of :meth:`LoRAPool.layer_arrays`) cut to the ``G`` slots of
    ``seg.slots``, in group order. Done once a step, before the scan over layers, so a layer reads
    only its ``G`` adapters' weights."""
    return {m: tuple(jnp.take(v, seg.slots, axis=axis, mode="clip") for v in arrays) for m, arrays in stacks.items()}


def segmented_lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scaling: jax.Array, seg: LoRASegments) -> jax.Array:
    """Per-token LoRA output ``scaling[s_t] * x_t A[s_t] B[s_t]`` as two grouped GEMMs over the
    step's adapters (:func:`jax.lax.ragged_dot`); equal to :func:`lora_delta` (same operation
    order: ``x A``, scaled in ``x``'s dtype, then ``B``).

    Args:
        x: ``[T, in]`` activations.
        a: ``[G, in, R]``; b: ``[G, R, out]``; scaling: float32 ``[G]``: one layer's stacks of the
            step's groups (:func:`group_stacks`), group ``g`` being slot ``seg.slots[g]``.
        seg: the step's :class:`LoRASegments`.
    Returns:
        ``[T, out]`` in ``x``'s dtype; rows of base-model tokens are 0.
    """
    t = x.shape[0]
    xs = jnp.take(x, seg.order, axis=0, mode="clip")
    xa = jax.lax.ragged_dot(xs, a.astype(x.dtype), seg.sizes)  # [T, R]; rows past the groups (base tokens) are 0
    row_scale = jnp.repeat(scaling, seg.sizes, total_repeat_length=t)
    xa = xa * row_scale.astype(x.dtype)[:, None]
    ys = jax.lax.ragged_dot(xa, b.astype(x.dtype), seg.sizes)  # [T, out]
    return jnp.take(ys, seg.inverse, axis=0, mode="clip")
