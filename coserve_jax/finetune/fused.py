"""The device side of co-serving finetuning: what the fused step and the backward slice do.

Token-level finetuning (:mod:`coserve_jax.finetune.token_level`) split over serving steps:

* **In the fused step** (:func:`coserve_jax.engine.step.make_step_fn`), a training sequence's
  forward chunk occupies token slots after the inference tokens, with its job's adapter index,
  KV pages and LoRA dropout. The layer scan gathers those slots' residual stream at every layer
  (``[L, C, H]``) and :func:`save_forward` scatters it into the job's rows of the
  **activation store**, then runs the loss head on the chunk's final hidden states and stores
  ``dL/dh_L`` (the head's backward is per token, so it needs no other chunk). The step returns the
  chunk's weighted loss.
* **The backward slice** (:func:`make_backward_fn`) recomputes ``layers_per_slice`` layers of the
  whole sequence from the saved inputs and takes their VJP with respect to the residual stream
  and the job's LoRA A/B, adding the slice's LoRA gradients into the job's gradient accumulator.
  It is its own executable, one per sequence-length bucket, dispatched in the same engine step
  right after the fused forward (the device runs the two back to back); compiling it into every
  step bucket instead would multiply start-up compile time by the number of step buckets for
  nothing, since XLA serializes the two anyway.

The buffers (:class:`FinetuneBuffers`) are donated to both executables, so they are updated in
place; their shapes never change, so no job, sequence length or slice recompiles anything.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from coserve_jax.finetune.token_level import BaseWeights, head_backward, slice_backward
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.config import ModelConfig
from coserve_jax.parallel.rules import ShardingRules


@dataclasses.dataclass(frozen=True)
class FinetuneLayout:
    """Static shapes of the finetuning buffers.

    Attributes:
        max_jobs: jobs that can train at once (rows of the activation store).
        max_seq_len: longest training sequence, in tokens (store rows per job).
        layers_per_slice: decoder layers per backward slice (divides ``num_layers``).
        seq_buckets: sequence lengths the backward is compiled for (ascending; the last is
            ``max_seq_len``).
    """

    max_jobs: int
    max_seq_len: int
    layers_per_slice: int
    seq_buckets: tuple[int, ...]

    def bucket_for(self, n: int) -> int:
        """The smallest backward bucket holding ``n`` tokens.

        Raises:
            ValueError: ``n > max_seq_len``.
        """
        for b in self.seq_buckets:
            if b >= n:
                return b
        raise ValueError(f"training sequence of {n} tokens exceeds finetune_max_seq_len={self.max_seq_len}")


class FinetuneBuffers(NamedTuple):
    """Device state of token-level finetuning (donated to the step and the backward).

    Attributes:
        acts: ``[L, max_jobs * max_seq_len, H]`` (model dtype): the saved input of every layer
            for every token of each job's sequence in flight (row ``job * max_seq_len + pos``).
        dh: float32 ``[max_jobs * max_seq_len, H]``: the gradient at the current slice boundary.
        grads: ``{m: {"A": [max_jobs, partials, L, in, R], "B": [max_jobs, partials, L, R, out]}}``
            float32: the LoRA gradients accumulated since the job's last optimizer step (R = the
            pool's rank). ``partials`` is 1, or under tensor parallelism the ``tp`` per-device
            partial sums of a replicated LoRA weight
            (:meth:`~coserve_jax.parallel.rules.ShardingRules.grad_partials`); the optimizer step
            sums them.
    """

    acts: jax.Array
    dh: jax.Array
    grads: dict


def init_buffers(
    config: ModelConfig, pool: LoRAPoolConfig, layout: FinetuneLayout, dtype, rules: ShardingRules | None = None
) -> FinetuneBuffers:
    """Zeroed :class:`FinetuneBuffers` for ``layout``, placed by ``rules`` (default: one device,
    no partial-sum axis beyond size 1)."""
    rows = layout.max_jobs * layout.max_seq_len
    L, H, J, R = config.num_layers, config.hidden_size, layout.max_jobs, pool.max_lora_rank
    specs = buffer_specs(pool.target_modules, rules)

    def zeros(shape, dt, spec):
        return jnp.zeros(shape, dt) if rules is None else rules.zeros(shape, dt, spec)

    grads = {}
    for m in pool.target_modules:
        d_in, d_out = config.module_dims(m)
        n_a, n_b = (1, 1) if rules is None else (rules.grad_partials(m, "A"), rules.grad_partials(m, "B"))
        grads[m] = {
            "A": zeros((J, n_a, L, d_in, R), jnp.float32, specs.grads[m]["A"]),
            "B": zeros((J, n_b, L, R, d_out), jnp.float32, specs.grads[m]["B"]),
        }
    return FinetuneBuffers(zeros((L, rows, H), dtype, specs.acts), zeros((rows, H), jnp.float32, specs.dh), grads)


def buffer_specs(modules, rules: ShardingRules | None) -> FinetuneBuffers:
    """:class:`PartitionSpec` s of the buffers: the saved activations and the boundary gradient
    replicated (the residual stream is), the gradient accumulators as
    :meth:`~coserve_jax.parallel.rules.ShardingRules.grad_acc_spec`."""
    rep = P()
    grads = {m: {w: rep if rules is None else rules.grad_acc_spec(m, w) for w in ("A", "B")} for m in modules}
    return FinetuneBuffers(rep, rep, grads)


def buffer_bytes(bufs: FinetuneBuffers) -> int:
    """Device bytes the buffers take."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bufs))


class FinetuneForward(NamedTuple):
    """The finetuning part of a step's inputs (``C`` = the bucket's finetuning slots).

    Attributes:
        save_slots: int32 ``[C]``: token slots of the training chunk (padding: 0).
        dest: int32 ``[C]``: store row of each (``job * max_seq_len + position``; padding: the
            number of rows, which the scatter drops).
        targets: int32 ``[C]``: the token each slot predicts.
        weights: float32 ``[C]``: its loss weight (``1 / normalizer`` or 0).
    """

    save_slots: jax.Array
    dest: jax.Array
    targets: jax.Array
    weights: jax.Array


def save_forward(
    config: ModelConfig, head: BaseWeights, bufs: FinetuneBuffers, fwd: FinetuneForward, layer_inputs, final_hidden
) -> tuple[FinetuneBuffers, jax.Array]:
    """Store a training chunk's layer inputs and its loss head gradient.

    The loss head (the LM head over the chunk's ``C`` slots, forward and VJP: ``~6 C H V``
    FLOPs) runs only when some slot has a nonzero loss weight (a ``lax.cond``): a step without a
    training chunk, or with a chunk of prompt tokens only, skips it and stores a zero gradient.
    (``compiled.cost_analysis()`` counts both branches, so this shows in step time, not in the
    compiled FLOPs.)

    Args:
        head: the final norm and LM head (``norm``, ``lm_head`` used).
        layer_inputs: ``[L, C, H]`` of the chunk's slots; final_hidden: ``[C, H]`` (pre-norm).
    Returns:
        ``(bufs, loss)``: updated buffers and the chunk's ``sum(weights * CE)`` (float32).
    """
    acts = bufs.acts.at[:, fwd.dest].set(layer_inputs.astype(bufs.acts.dtype), mode="drop")
    loss, dh = jax.lax.cond(
        jnp.any(fwd.weights != 0),
        lambda h: head_backward(config, head, h, fwd.targets, fwd.weights),
        lambda h: (jnp.float32(0.0), jnp.zeros_like(h)),
        final_hidden,
    )
    dh_store = bufs.dh.at[fwd.dest].set(dh.astype(jnp.float32), mode="drop")
    return FinetuneBuffers(acts, dh_store, bufs.grads), loss


class BackwardInputs(NamedTuple):
    """One backward slice (scalars).

    Attributes:
        row: the job's store row (int32); adapter_index: its adapter index in the pool (int32,
        >= 1); first_layer: the slice's lowest layer (int32); seq_len: tokens of the sequence
        (int32); dropout_rate (float32), dropout_seed (uint32): its LoRA dropout.
    """

    row: jax.Array
    adapter_index: jax.Array
    first_layer: jax.Array
    seq_len: jax.Array
    dropout_rate: jax.Array
    dropout_seed: jax.Array


def abstract_backward_inputs(sharding: jax.sharding.Sharding | None = None) -> BackwardInputs:
    """``ShapeDtypeStruct`` s of :class:`BackwardInputs` (placed with ``sharding``), for lowering."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)
    return BackwardInputs(
        i32, i32, i32, i32, jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding),
        jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding),
    )


def make_backward_fn(graphdef, config: ModelConfig, layout: FinetuneLayout, length: int, parallel: ShardingRules | None = None):
    """The backward slice for sequences of up to ``length`` tokens, as a pure function
    ``(state, bufs, inputs: BackwardInputs) -> bufs`` (jit it with ``bufs`` donated).

    Rows past ``seq_len`` are padding: their boundary gradient is zeroed, so (causal attention)
    they contribute nothing to the real tokens' gradients. With ``parallel`` the slice runs as one
    ``jax.shard_map`` over the tensor-parallel mesh: each device adds its gradient shard, or its
    partial sum of a replicated LoRA weight, into its block of the accumulator (no collective on
    LoRA gradients here).
    """
    nl = layout.layers_per_slice
    tp = None if parallel is None else parallel.tensor_parallel

    def local(layers: dict, pool: dict, bufs: FinetuneBuffers, inp: BackwardInputs) -> FinetuneBuffers:
        slot = inp.adapter_index - 1
        lora = {
            m: {k: jax.lax.dynamic_index_in_dim(w, slot, axis=1, keepdims=False) for k, w in (("A", a), ("B", b))}
            for m, (a, b, _) in pool.items()
        }
        scaling = {m: jax.lax.dynamic_index_in_dim(s, slot, axis=1, keepdims=False) for m, (_, _, s) in pool.items()}
        start = inp.row * layout.max_seq_len
        li = jax.lax.dynamic_slice_in_dim(bufs.acts, start, length, axis=1)
        dh = jax.lax.dynamic_slice_in_dim(bufs.dh, start, length, axis=0)
        valid = jnp.arange(length) < inp.seq_len
        dh = jnp.where(valid[:, None], dh, 0.0)
        positions = jnp.arange(length, dtype=jnp.int32)
        dh, g = slice_backward(
            config, layers, lora, scaling, li, positions, dh, inp.first_layer, nl, inp.dropout_rate, inp.dropout_seed, tp
        )
        dh_store = jax.lax.dynamic_update_slice_in_dim(bufs.dh, dh.astype(jnp.float32), start, axis=0)
        grads = {}
        for m, acc in bufs.grads.items():
            grads[m] = {}
            for k in ("A", "B"):
                idx = (inp.row, 0, inp.first_layer, 0, 0)
                cur = jax.lax.dynamic_slice(acc[k], idx, (1, 1) + g[m][k].shape)
                grads[m][k] = jax.lax.dynamic_update_slice(acc[k], cur + g[m][k][None, None], idx)
        return FinetuneBuffers(bufs.acts, dh_store, grads)

    def backward(state, bufs: FinetuneBuffers, inp: BackwardInputs) -> FinetuneBuffers:
        model = nnx.merge(graphdef, state)
        layers, pool = model.layers.arrays(), model.lora.layer_arrays()
        if parallel is None:
            return local(layers, pool, bufs, inp)
        bspecs = buffer_specs(pool, parallel)
        specs = (parallel.layer_specs(layers), parallel.pool_specs(pool), bspecs, P())
        return jax.shard_map(local, mesh=parallel.mesh, in_specs=specs, out_specs=bspecs)(layers, pool, bufs, inp)

    return backward


def zero_grads_row(grads: dict, row) -> dict:
    """``grads`` (``FinetuneBuffers.grads``) with job row ``row`` zeroed."""
    return jax.tree.map(lambda g: jax.lax.dynamic_update_index_in_dim(g, jnp.zeros(g.shape[1:], g.dtype), row, 0), grads)


zero_row = jax.jit(zero_grads_row, donate_argnums=0)
"""``(grads, row) -> grads`` with a job's accumulator row zeroed (a new job taking the row)."""
