"""The device side of co-serving finetuning: what the fused step and the backward slice do.

Token-level finetuning (:mod:`coserve_jax.finetune.token_level`) split over serving steps:

* **In the fused step** (:func:`coserve_jax.engine.step.make_step_fn`), training sequences'
  forward chunks occupy token slots after the inference tokens, each a sequence of the step with
  its job's adapter index, its example's KV pages and LoRA dropout. The layer scan gathers those
  slots' residual stream at every layer (``[L, C, H]``) and :func:`save_forward` scatters it into
  the sequences' rows of the **activation store**, then runs the loss head on the chunks' final
  hidden states and stores ``dL/dh_L`` (the head's backward is per token, so it needs no other
  chunk). The step returns each chunk's weighted loss.
* **The backward** (:func:`make_backward_fn`) recomputes any number of layers (traced: one
  executable per sequence-length bucket serves every count) of a whole training sequence, a pack
  of examples with attention kept within each, from the saved inputs, and takes their VJP with
  respect to the residual stream and the job's LoRA A/B, adding each layer's LoRA gradient into
  the job's gradient accumulator. It is its own executable, dispatched in the same engine step
  right after the fused forward (the device runs the two back to back); compiling it into every
  step bucket instead would multiply start-up compile time by the number of step buckets for
  nothing, since XLA serializes the two anyway.

* **The idle train step** (:func:`make_train_fn`): when no inference runs, a whole training
  sequence (a pack) needs no token slots, KV pages or saved layer inputs: its forward, loss and
  backward run as one executable (``jax.value_and_grad`` over a scan of the layers whose
  ``jax.checkpoint`` policy keeps the matmul outputs, so the backward recomputes the attention
  and the elementwise work but no linear layer), adding its gradient into the job's accumulator.

The buffers (:class:`FinetuneBuffers`) are donated to every executable, so they are updated in
place; their shapes never change, so no job, sequence length or slice recompiles anything.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import PartitionSpec as P

from coserve_jax.finetune.policy_losses import coded_coefficients
from coserve_jax.finetune.token_level import BaseWeights, backward_layers, base_weights, token_losses
from coserve_jax.lora.dropout import LoRADropout
from coserve_jax.models import rope
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.decoder import decoder_layer
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.config import ModelConfig
from coserve_jax.parallel.rules import ShardingRules


@dataclasses.dataclass(frozen=True)
class FinetuneLayout:
    """Static shapes of the finetuning buffers.

    Attributes:
        max_jobs: jobs that can train at once (rows of the gradient accumulator).
        max_seq_len: longest training sequence (a pack of examples), in tokens.
        layers_per_slice: decoder layers of backward work per step while inference runs, when
            the step policy does not size it (divides ``num_layers``).
        seq_buckets: sequence lengths the backward is compiled for (ascending; the last is
            ``max_seq_len``).
        store_rows: token rows of the activation store, shared by the sequences in flight (at
            least ``max_seq_len``).
    """

    max_jobs: int
    max_seq_len: int
    layers_per_slice: int
    seq_buckets: tuple[int, ...]
    store_rows: int = 0

    def __post_init__(self):
        if not self.store_rows:
            object.__setattr__(self, "store_rows", 2 * self.max_jobs * self.max_seq_len)
        if self.store_rows < self.max_seq_len:
            raise ValueError(f"the activation store's {self.store_rows} rows cannot hold one {self.max_seq_len}-token sequence")

    @property
    def num_rows(self) -> int:
        """Rows of the store arrays: ``store_rows``, then ``max_seq_len`` rows never handed out
        (a backward's slice that starts near the end reads them as padding)."""
        return self.store_rows + self.max_seq_len

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
        acts: ``[L, num_rows, H]`` (model dtype): the saved input of every layer for every token
            of the training sequences in flight (each sequence's tokens in consecutive rows that
            the scheduler handed it, :class:`~coserve_jax.sched.finetune.StoreAllocator`).
        dh: float32 ``[num_rows, H]``: each token's gradient at its sequence's backward boundary.
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
    rows = layout.num_rows
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
        save_slots: int32 ``[C]``: token slots of the training chunks (padding: 0).
        dest: int32 ``[C]``: store row of each (padding and forward-only chunks: the number of
            rows, which the scatter drops).
        targets: int32 ``[C]``: the token each slot predicts.
        weights: float32 ``[C]``: its loss weight (``1 / normalizer`` or 0; a policy loss's
            advantage).
        loss_code: int32 ``[C]``: its loss (:data:`~coserve_jax.finetune.policy_losses.LOSS_CODES`;
            0, weighted cross-entropy, for a finetuning job).
        loss_params: float32 ``[C, 3]``: the sampler's logprob and PPO's clip thresholds
            (:func:`~coserve_jax.finetune.policy_losses.coded_coefficients`).
        seq: int32 ``[C]``: its sequence slot in the step (padding: ``S``, dropped), to sum each
            chunk's loss.
        head_index: int32 ``[C]``: the slots the loss head runs on (a nonzero loss weight, or
            a chunk that returns its logprobs), first (then ``C``).
        head_bucket: int32 scalar: how many slots the loss head runs on: 0 none, ``k`` the
            ``k``-th of :func:`~coserve_jax.engine.step_inputs.head_sizes` (the smallest that
            holds every head slot).
    """

    save_slots: jax.Array
    dest: jax.Array
    targets: jax.Array
    weights: jax.Array
    loss_code: jax.Array
    loss_params: jax.Array
    seq: jax.Array
    head_index: jax.Array
    head_bucket: jax.Array


def _head_rows(h, head_index, targets, size: int):
    """The first ``size`` of ``head_index`` (the head rows, then out-of-range padding) and
    their hidden states and targets (0 for padding)."""
    idx = head_index[:size]
    return idx, jnp.take(h, idx, axis=0, mode="fill", fill_value=0), jnp.take(targets, idx, mode="fill", fill_value=0)


def _head_coefficients(idx, weights, loss_code, loss_params, logprobs):
    """The loss coefficients of head rows ``idx`` (0 for padding rows) from their logprobs."""
    w = jnp.take(weights, idx, mode="fill", fill_value=0)
    code = jnp.take(loss_code, idx, mode="fill", fill_value=0)
    prm = jnp.take(loss_params, idx, axis=0, mode="fill", fill_value=0)
    return coded_coefficients(code, w, prm, logprobs)


def save_forward(
    config: ModelConfig, head: BaseWeights, bufs: FinetuneBuffers, fwd: FinetuneForward, layer_inputs, final_hidden,
    num_seqs: int, head_sizes: tuple[int, ...],
) -> tuple[FinetuneBuffers, jax.Array, jax.Array]:
    """Store training chunks' layer inputs and their loss head gradient.

    The loss head (the LM head, forward and VJP: ``~4 n H V`` FLOPs for ``n`` tokens) computes
    each head slot's target logprob ``p_t``, its loss coefficient ``c_t`` from it
    (:func:`~coserve_jax.finetune.policy_losses.coded_coefficients`: the weight for
    cross-entropy, a policy loss's ``-dloss/dp_t``) and ``dL/dh = sum_t c_t dCE_t/dh``. It runs
    only on the head slots (a nonzero weight or a chunk returning its logprobs; prompt tokens of
    a finetuning job are neither), gathered into the
    smallest of ``head_sizes`` that holds them (a ``lax.switch``: ``fwd.head_bucket`` picks the
    size, 0 skips the head). A step without training chunks also skips the store's scatter (a
    ``lax.cond``). (``compiled.cost_analysis()`` counts every branch, so this shows in step time,
    not in the compiled FLOPs.)

    Args:
        head: the final norm and LM head (``norm``, ``lm_head`` used).
        layer_inputs: ``[L, C, H]`` of the chunks' slots; final_hidden: ``[C, H]`` (pre-norm).
        num_seqs: the step's sequence slots ``S``.
        head_sizes: the loss head's sizes (:func:`~coserve_jax.engine.step_inputs.head_sizes` of ``C``).
    Returns:
        ``(bufs, losses, logprobs)``: updated buffers; float32 ``[S]``: each sequence slot's
        ``sum(c * CE)`` (0 for inference sequences); float32 ``[C]``: each head slot's ``p_t``
        (0 elsewhere).
    """
    c = final_hidden.shape[0]
    acts = jax.lax.cond(
        fwd.seq[0] < num_seqs,  # a training chunk is in the step
        lambda a: a.at[:, fwd.dest].set(layer_inputs.astype(a.dtype), mode="drop"), lambda a: a, bufs.acts,
    )

    def head_loss(size):
        def run(h):
            idx, hs, t = _head_rows(h, fwd.head_index, fwd.targets, size)
            ce, vjp = jax.vjp(lambda x: token_losses(config, head, x, t), hs)
            coef = _head_coefficients(idx, fwd.weights, fwd.loss_code, fwd.loss_params, -ce)
            (dh,) = vjp(coef)
            loss = jnp.zeros((c,), jnp.float32).at[idx].add(coef * ce, mode="drop")
            logprobs = jnp.zeros((c,), jnp.float32).at[idx].add(-ce, mode="drop")
            return loss, logprobs, jnp.zeros_like(h).at[idx].add(dh, mode="drop")
        return run

    def no_head(h):
        return jnp.zeros((c,), jnp.float32), jnp.zeros((c,), jnp.float32), jnp.zeros_like(h)

    per_token, logprobs, dh = jax.lax.switch(fwd.head_bucket, [no_head] + [head_loss(n) for n in head_sizes], final_hidden)
    dh_store = bufs.dh.at[fwd.dest].set(dh.astype(jnp.float32), mode="drop")
    losses = jnp.zeros((num_seqs,), jnp.float32).at[fwd.seq].add(per_token, mode="drop")
    return FinetuneBuffers(acts, dh_store, bufs.grads), losses, logprobs


class BackwardInputs(NamedTuple):
    """One backward of a training sequence (scalars, then ``[N]`` rows of its length bucket).

    Attributes:
        store_row: its first activation-store row (int32); grad_row: its job's accumulator row
        (int32); adapter_index: its adapter index in the pool (int32, >= 1); first_layer: the
        lowest layer to run (int32); num_layers: layers to run, top down (int32);
        dropout_rate: its LoRA dropout rate (float32);
        positions: int32 ``[N]``: each row's position in its example; segment_ids: int32
        ``[N]``: each row's example (``-1``: padding); dropout_seed: uint32 ``[N]``: each row's
        example's LoRA dropout seed.
    """

    store_row: jax.Array
    grad_row: jax.Array
    adapter_index: jax.Array
    first_layer: jax.Array
    num_layers: jax.Array
    dropout_rate: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    dropout_seed: jax.Array


def abstract_backward_inputs(length: int, sharding: jax.sharding.Sharding | None = None) -> BackwardInputs:
    """``ShapeDtypeStruct`` s of :class:`BackwardInputs` for length bucket ``length`` (placed with
    ``sharding``), for lowering."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    i32 = sds((), jnp.int32)
    return BackwardInputs(
        i32, i32, i32, i32, i32, sds((), jnp.float32), sds((length,), jnp.int32), sds((length,), jnp.int32),
        sds((length,), jnp.uint32),
    )


def make_backward_fn(graphdef, config: ModelConfig, layout: FinetuneLayout, length: int, parallel: ShardingRules | None = None):
    """The backward for sequences of up to ``length`` tokens, as a pure function
    ``(state, bufs, inputs: BackwardInputs) -> bufs`` (jit it with ``bufs`` donated).

    It runs ``inputs.num_layers`` layers (traced: one executable for any count) on the store rows
    ``store_row .. store_row + length - 1``; rows past the sequence (``segment_ids < 0``) are
    padding: their boundary gradient is zeroed, they attend to nothing and nothing attends to them,
    so they contribute nothing, and their stored gradient is left as it was (the rows may belong
    to another sequence). With ``parallel`` the backward runs as one ``jax.shard_map`` over the
    tensor-parallel mesh: each device adds its gradient shard, or its partial sum of a replicated
    LoRA weight, into its block of the accumulator (no collective on LoRA gradients here).
    """
    tp = None if parallel is None else parallel.tensor_parallel

    def local(layers: dict, pool: dict, bufs: FinetuneBuffers, inp: BackwardInputs) -> FinetuneBuffers:
        slot = inp.adapter_index - 1
        lora = {
            m: {k: jax.lax.dynamic_index_in_dim(w, slot, axis=1, keepdims=False) for k, w in (("A", a), ("B", b))}
            for m, (a, b, _) in pool.items()
        }
        scaling = {m: jax.lax.dynamic_index_in_dim(s, slot, axis=1, keepdims=False) for m, (_, _, s) in pool.items()}
        start = inp.store_row
        li = jax.lax.dynamic_slice_in_dim(bufs.acts, start, length, axis=1)
        dh_old = jax.lax.dynamic_slice_in_dim(bufs.dh, start, length, axis=0)
        valid = (inp.segment_ids >= 0)[:, None]
        dh = jnp.where(valid, dh_old, 0.0)
        acc = {m: {k: bufs.grads[m][k][inp.grad_row, 0] for k in ("A", "B")} for m in bufs.grads}
        drop = LoRADropout(jnp.full((length,), inp.dropout_rate, jnp.float32), inp.dropout_seed, inp.positions)
        dh, acc = backward_layers(
            config, layers, lora, scaling, li, inp.positions, inp.segment_ids, dh, inp.first_layer, inp.num_layers,
            acc, drop, tp,
        )
        dh_new = jnp.where(valid, dh.astype(jnp.float32), dh_old)
        dh_store = jax.lax.dynamic_update_slice_in_dim(bufs.dh, dh_new, start, axis=0)
        grads = {
            m: {k: jax.lax.dynamic_update_slice(g[k], acc[m][k][None, None], (inp.grad_row, 0, 0, 0, 0)) for k in ("A", "B")}
            for m, g in bufs.grads.items()
        }
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


class TrainInputs(NamedTuple):
    """One whole training sequence (a pack) for the idle train step (``[N]`` rows of its length
    bucket, then scalars).

    Attributes:
        tokens, targets: int32 ``[N]``: the pack's tokens and the token each predicts;
        weights: float32 ``[N]``: each prediction's loss weight (0 on prompt tokens and padding;
        a policy loss's advantage); loss_code: int32 ``[N]``, loss_params: float32 ``[N, 3]``:
        each row's loss (as :class:`FinetuneForward`); positions: int32 ``[N]``: each row's position in its example; segment_ids: int32 ``[N]``:
        each row's example (``-1``: padding); dropout_seed: uint32 ``[N]``: each row's example's
        LoRA dropout seed; head_index: int32 ``[N]``: the loss head's rows (a nonzero weight, or
        a sequence returning its logprobs), first (then ``N``); head_bucket: int32: the loss head's size (as :class:`FinetuneForward`);
        grad_row, adapter_index: int32: the job's accumulator row and adapter; dropout_rate:
        float32.
    """

    tokens: jax.Array
    targets: jax.Array
    weights: jax.Array
    loss_code: jax.Array
    loss_params: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    dropout_seed: jax.Array
    head_index: jax.Array
    head_bucket: jax.Array
    grad_row: jax.Array
    adapter_index: jax.Array
    dropout_rate: jax.Array


def abstract_train_inputs(length: int) -> TrainInputs:
    """``ShapeDtypeStruct`` s of :class:`TrainInputs` for length bucket ``length``, for lowering."""
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    row = sds((length,), jnp.int32)
    return TrainInputs(row, row, sds((length,), jnp.float32), row, sds((length, 3), jnp.float32), row, row,
                       sds((length,), jnp.uint32), row,
                       sds((), jnp.int32), sds((), jnp.int32), sds((), jnp.int32), sds((), jnp.float32))


def make_train_fn(graphdef, config: ModelConfig, length: int, head_sizes: tuple[int, ...]):
    """The idle train step for sequences of up to ``length`` tokens, as a pure function
    ``(state, bufs, inputs: TrainInputs) -> (bufs, loss, logprobs)`` (jit it with ``bufs``
    donated): the pack's summed ``c * CE`` (float32; the loss coefficients ``c`` as in
    :func:`save_forward`, held constant), each row's target logprob (float32 ``[N]``, 0 off the
    head rows) and its LoRA gradient added into the job's row of ``bufs.grads`` (single device:
    the tensor-parallel engine uses the token-level path).

    The same gradient as the token-level forward and backward (the pack's examples attend within
    themselves, dropout masks keyed the same way), computed as one ``jax.value_and_grad``: the
    layers' scan is checkpointed with ``dots_with_no_batch_dims_saveable`` (the projections'
    outputs are kept, attention and elementwise work recomputed), so no linear layer runs twice.
    """

    def train(state, bufs: FinetuneBuffers, inp: TrainInputs):
        model = nnx.merge(graphdef, state)
        base = base_weights(model)
        pool = model.lora.layer_arrays()
        slot = inp.adapter_index - 1
        lora = {m: {"A": a[:, slot], "B": b[:, slot]} for m, (a, b, _) in pool.items()}
        scaling = {m: s[:, slot] for m, (_, _, s) in pool.items()}
        n = length
        positions, seg = inp.positions, inp.segment_ids
        drop = LoRADropout(jnp.full((n,), inp.dropout_rate, jnp.float32), inp.dropout_seed, positions)
        mask = packed_causal_mask(seg, positions)
        scale = config.head_dim ** -0.5
        h0 = jnp.take(base.embed, inp.tokens, axis=0)
        cos, sin = rope.cos_sin(config, positions, h0.dtype)
        onehot = jnp.ones((n, 1), jnp.float32)

        def layer_fn(h, xs):
            p, lo, sc, layer = xs
            lora_layer = {m: (lo[m]["A"][None], lo[m]["B"][None], jnp.reshape(sc[m], (1,))) for m in lo}
            out = decoder_layer(config, p, lora_layer, h, cos, sin, onehot,
                                lambda q, k, v: dense_attention(q, k, v, mask, scale), drop.at_layer(layer))
            return out, None

        body = jax.checkpoint(layer_fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        def head_loss(size):
            def run(h):
                idx, hs, t = _head_rows(h, inp.head_index, inp.targets, size)
                ce = token_losses(config, base, hs, t)
                coef = jax.lax.stop_gradient(_head_coefficients(idx, inp.weights, inp.loss_code, inp.loss_params, -ce))
                logprobs = jnp.zeros((n,), jnp.float32).at[idx].add(-jax.lax.stop_gradient(ce), mode="drop")
                return jnp.sum(coef * ce), logprobs
            return run

        def no_head(h):
            return jnp.float32(0.0), jnp.zeros((n,), jnp.float32)

        def loss_fn(lora):
            h, _ = jax.lax.scan(body, h0, (base.layers, lora, scaling, jnp.arange(config.num_layers, dtype=jnp.int32)))
            return jax.lax.switch(inp.head_bucket, [no_head] + [head_loss(k) for k in head_sizes], h)

        (loss, logprobs), g = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        grads = {
            m: {k: jax.lax.dynamic_update_index_in_dim(
                acc[k], acc[k][inp.grad_row] + g[m][k].astype(jnp.float32)[None], inp.grad_row, 0) for k in ("A", "B")}
            for m, acc in bufs.grads.items()
        }
        return FinetuneBuffers(bufs.acts, bufs.dh, grads), loss, logprobs

    return train


def zero_grads_row(grads: dict, row) -> dict:
    """``grads`` (``FinetuneBuffers.grads``) with job row ``row`` zeroed."""
    return jax.tree.map(lambda g: jax.lax.dynamic_update_index_in_dim(g, jnp.zeros(g.shape[1:], g.dtype), row, 0), grads)


zero_row = jax.jit(zero_grads_row, donate_argnums=0)
"""``(grads, row) -> grads`` with a job's accumulator row zeroed (a new job taking the row)."""
