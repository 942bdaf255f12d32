"""Optimizer, schedule and initialisation of a job's LoRA weights, and the optimizer step.

A job keeps float32 master weights at its own rank, ``{m: {"A": [L, in, r], "B": [L, r, out]}}``,
and an optax state. The optimizer step (:func:`make_update_fn`) reads the gradient the backward
slices accumulated for the job (at the pool's padded rank), updates the master weights, zeroes the
accumulator and returns the weights padded and cast for the serving pool.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from coserve_jax.finetune.config import FinetuneConfig, LoRAConfig
from coserve_jax.finetune.fused import zero_grads_row
from coserve_jax.models.config import ModelConfig


def learning_rate_schedule(cfg: FinetuneConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then ``cfg.lr_scheduler_type`` until
    ``total_steps`` (``transformers.get_scheduler`` semantics: step ``k``'s rate is the schedule
    at ``k``, the count of updates before it)."""
    lr, warm = cfg.learning_rate, min(cfg.warmup_steps, total_steps)
    decay = max(total_steps - warm, 1)
    if cfg.lr_scheduler_type == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.lr_scheduler_type == "linear":
        after = optax.linear_schedule(lr, 0.0, decay)
    else:
        after = optax.cosine_decay_schedule(lr, decay)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(cfg: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping (global norm) followed by AdamW or SGD with the schedule."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    else:
        opt = optax.sgd(schedule, momentum=cfg.momentum or None)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt


def init_lora(config: ModelConfig, lora: LoRAConfig, seed: int) -> dict:
    """Fresh float32 LoRA weights ``{m: {"A": [L, in, r], "B": [L, r, out]}}``: A as
    ``peft``'s ``reset_lora_parameters`` draws it (Kaiming-uniform with ``a = sqrt(5)``, bound
    ``1 / sqrt(in)``; or N(0, 1/r) for ``"gaussian"``), B zero."""
    key = jax.random.key(seed)
    out = {}
    L, r = config.num_layers, lora.r
    for i, m in enumerate(lora.target_modules):
        d_in, d_out = config.module_dims(m)
        k = jax.random.fold_in(key, i)
        if lora.init_lora_weights == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (L, d_in, r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (L, d_in, r), jnp.float32) / r
        out[m] = {"A": a, "B": jnp.zeros((L, r, d_out), jnp.float32)}
    return out


def make_update_fn(
    tx: optax.GradientTransformation, schedule: optax.Schedule, rank: int, pool_rank: int, pool_dtype, pool_shapes: dict
):
    """The optimizer step as a pure function
    ``(params, opt_state, grads_acc, row, step) -> (params, opt_state, grads_acc, pool_weights, grad_norm, lr)``.

    Args:
        tx: the job's optimizer; schedule: its learning-rate schedule (``lr`` reported is
            ``schedule(step)``, ``step`` = optimizer steps done before this one).
        rank: the job's rank r; pool_rank: the pool's padded rank R; pool_dtype: the pool's dtype;
        pool_shapes: ``{m: (A shape, B shape)}`` of one slot for every pool module (modules the
        job does not train get zeros).
    The function takes ``grads_acc`` (``FinetuneBuffers.grads``: ``{m: {"A": [J, partials, L, in, R], ...}}``,
    donate it; the partials are summed), uses row ``row`` of the job's modules, zeroes that row of every module, and returns
    ``pool_weights = {m: (A [L, in, R], B [L, R, out])}`` in ``pool_dtype`` and the global norm of
    the gradient before clipping (float32).
    """

    def update(params, opt_state, grads_acc, row, step):
        grads = {
            m: {
                # Summing the per-device partials is the LoRA gradient's one all-reduce per
                # optimizer step under tensor parallelism (coserve_jax.parallel.rules).
                "A": jnp.sum(jax.lax.dynamic_index_in_dim(grads_acc[m]["A"], row, 0, keepdims=False), axis=0)[:, :, :rank],
                "B": jnp.sum(jax.lax.dynamic_index_in_dim(grads_acc[m]["B"], row, 0, keepdims=False), axis=0)[:, :rank, :],
            }
            for m in params
        }
        norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        zeroed = zero_grads_row(grads_acc, row)
        pool = pool_weights(params, rank, pool_rank, pool_dtype, pool_shapes)
        return params, opt_state, zeroed, pool, norm, jnp.asarray(schedule(step), jnp.float32)

    return update


def pool_weights(params: dict, rank: int, pool_rank: int, pool_dtype, pool_shapes: dict) -> dict:
    """A trainer's master weights as one pool slot's arrays (what
    :meth:`~coserve_jax.lora.manager.AdapterManager.write_weights` takes): ``{m: (A [L, in, R],
    B [L, R, out])}`` padded from rank ``rank`` to the pool's ``pool_rank``, cast to
    ``pool_dtype``; modules of ``pool_shapes`` the trainer does not train are zeros."""
    pool = {}
    for m, (a_shape, b_shape) in pool_shapes.items():
        if m in params:
            pool[m] = (
                jnp.pad(params[m]["A"], ((0, 0), (0, 0), (0, pool_rank - rank))).astype(pool_dtype),
                jnp.pad(params[m]["B"], ((0, 0), (0, pool_rank - rank), (0, 0))).astype(pool_dtype),
            )
        else:
            pool[m] = (jnp.zeros(a_shape, pool_dtype), jnp.zeros(b_shape, pool_dtype))
    return pool
