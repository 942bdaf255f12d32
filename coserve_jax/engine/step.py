"""The fused serving step: one jitted function over a flat batch of token slots, per shape bucket.

A step takes ``T`` token slots (decode tokens and prefill chunks of up to ``S`` sequences, packed
back to back, then padding) and the paged KV cache, runs the model once, writes the new K/V into
the pages, and samples one token for the last position of every sequence. Shapes are padded to a
few buckets ``(T, S)`` (by default powers of two of ``T`` up to the step's limit, each with
``S = min(T, max_num_seqs)``: :func:`make_buckets`), each compiled ahead of time at start-up; the KV cache arguments are donated so XLA updates them in place. Calling a
compiled bucket never traces or compiles again, which :class:`~coserve_jax.compile_counter.CompileCounter`
lets tests check.

The model's parameters are an argument (an ``nnx.State``), not constants baked into the
executable, so loading an adapter changes values only.

With finetuning on, the step also carries training sequences' forward chunks in token slots
after the inference tokens, saves their layer inputs into the donated activation store and runs
their loss head (:mod:`coserve_jax.finetune.fused`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from coserve_jax.executable_cache import ExecutableCache, compile_ahead
from coserve_jax.engine.sampler import SamplerOutput, apply_repetition_penalty, sample
from coserve_jax.engine.step_inputs import Bucket, StepDims, StepInputs, abstract_inputs, head_sizes
from coserve_jax.finetune.fused import FinetuneBuffers, save_forward
from coserve_jax.finetune.token_level import base_weights
from coserve_jax.kernels.paged_attention import AttentionMetadata, paged_attention
from coserve_jax.models.decoder import CausalLM
from coserve_jax.parallel.rules import ShardingRules

log = logging.getLogger("coserve_jax.engine")


def powers_of_two(lo: int, hi: int) -> list[int]:
    """``lo, 2 lo, 4 lo, ...`` below ``hi``, then ``hi`` itself."""
    out, x = [], lo
    while x < hi:
        out.append(x)
        x *= 2
    out.append(hi)
    return out


def make_buckets(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    token_buckets: Sequence[int] | None = None,
    seq_buckets: Sequence[int] | None = None,
) -> list[Bucket]:
    """The compiled step shapes ``(T, S)``.

    Token slots ``T``: ``token_buckets`` (default powers of two from 16 up to
    ``max_num_batched_tokens``). Sequence slots: without ``seq_buckets``, each ``T`` gets one
    derived ``S = min(T, max_num_seqs)`` (the most sequences ``T`` tokens can hold, since every
    sequence of a step has at least one token), so there are ``|T|`` executables and any batch
    that fits ``T`` tokens fits its bucket; the price is padding: a prefill step of few
    sequences samples ``S`` rows (the LM head on ``S`` rows, small beside the body's ``T``). With
    ``seq_buckets``, the grid: every ``(T, S)`` with ``S <= T`` from the two lists, plus
    ``S = min(T, max_num_seqs)`` for each ``T`` (``|T| x |S|`` executables, less padding).

    Raises:
        ValueError: a bucket list whose largest entry is not the limit.
    """
    tb = sorted(set(token_buckets or powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens)))
    if tb[-1] != max_num_batched_tokens:
        raise ValueError(f"the largest token bucket must be max_num_batched_tokens={max_num_batched_tokens}, got {tb}")
    out = {Bucket(t, min(t, max_num_seqs)) for t in tb}
    if seq_buckets:
        sb = sorted(set(seq_buckets))
        if sb[-1] != max_num_seqs:
            raise ValueError(f"the largest sequence bucket must be max_num_seqs={max_num_seqs}, got {sb}")
        out |= {Bucket(t, s) for t in tb for s in sb if s <= t}
    return sorted(out)


def pick_bucket(buckets: Sequence[Bucket], num_tokens: int, num_seqs: int) -> Bucket:
    """The smallest bucket (fewest token slots, then fewest sequence slots) that fits.

    Raises:
        ValueError: no bucket is large enough.
    """
    for b in buckets:  # sorted by (T, S)
        if b.num_tokens >= num_tokens and b.num_seqs >= num_seqs:
            return b
    raise ValueError(f"no step bucket holds {num_tokens} tokens and {num_seqs} sequences")


def configure_compilation_cache(path: str | os.PathLike | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (``None``: leave the setting alone).

    Every executable is cached, however fast it compiled, so a restart with the same model,
    buckets and jax version loads the step instead of compiling it.
    """
    if path is None:
        return
    from jax.experimental.compilation_cache import compilation_cache

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        # JAX decides once per process whether the cache is in use; start over for a new directory.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct`` (shape, dtype, sharding)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def model_key(model: CausalLM, graphdef: Any) -> str:
    """The model's structure as text, for executable-cache keys: its configuration, its LoRA
    pool's and its graph (the state's shapes and dtypes enter the keys separately)."""
    pool = model.lora.config if model.lora is not None else None
    return f"{model.config!r} {pool!r} {graphdef!r}"


class StepOutput(NamedTuple):
    """What a step leaves on the device (replicated under tensor parallelism).

    Attributes:
        sampler: :class:`~coserve_jax.engine.sampler.SamplerOutput`, ``[S]`` rows.
        ft_loss: float32 ``[S]``: each sequence slot's summed weighted finetuning loss (0 but for
            the slots of training chunks).
        ft_logprobs: float32 ``[C]``: each finetuning slot's target logprob where the loss head
            ran (weighted tokens, chunks returning logprobs), else 0 (``[0]`` without finetuning).
        last_tokens: int32 ``[M]``: the sampled tokens padded to ``max_num_seqs``, the next
            step's ``prev_tokens``.
    """

    sampler: SamplerOutput
    ft_loss: jax.Array
    ft_logprobs: jax.Array
    last_tokens: jax.Array


def make_step_fn(graphdef: Any, *, scale: float, impl: str, max_logprobs: int, parallel: ShardingRules | None = None,
                 lora_groups: int = 0):
    """The step as a pure function
    ``(state, k_cache, v_cache, ft_buffers, seen, prev_tokens, inputs) -> (k_cache, v_cache, ft_buffers, seen, StepOutput)``.

    ``seen`` bool ``[rows, V]`` is the persistent seen-token mask of the repetition penalty
    (:func:`~coserve_jax.engine.sampler.apply_repetition_penalty`), updated only in steps where a
    sequence has a penalty (a ``lax.cond``: other steps pass it through untouched).

    ``prev_tokens`` int32 ``[M]`` are the previous step's sampled tokens (its
    :attr:`StepOutput.last_tokens`): a token slot with ``inputs.prev_index >= 0`` reads its token
    there, on the device, so a step can be dispatched before the host has seen the previous one's
    tokens. ``ft_buffers`` (:class:`FinetuneBuffers`) and ``inputs.finetune`` are ``None`` on an
    engine without finetuning; ``ft_loss`` is then 0.

    Args:
        graphdef: from ``nnx.split(model)``.
        scale: attention score scale (``head_dim ** -0.5``).
        impl: attention implementation (:data:`coserve_jax.kernels.paged_attention.IMPLEMENTATIONS`).
        max_logprobs: top logprobs returned per sequence.
        lora_groups: ``G > 0``: adapters as grouped GEMMs over at most ``G`` distinct adapters a
            step (the scheduler's ``max_loras_per_batch``); 0: the one-hot reference over every slot.
        parallel: tensor-parallel placement (:class:`~coserve_jax.parallel.rules.ShardingRules`):
            the decoder layers run as one ``shard_map``; the sampler's outputs and the loss come
            back replicated, readable by every process.
    """

    def step(state, k_cache, v_cache, ft_buffers: FinetuneBuffers | None, seen: jax.Array, prev_tokens: jax.Array,
             inputs: StepInputs):
        model: CausalLM = nnx.merge(graphdef, state)
        prev = inputs.prev_index
        token_ids = jnp.where(prev >= 0, jnp.take(prev_tokens, jnp.maximum(prev, 0)), inputs.token_ids)

        def attend(q, k, v, cache, layer, meta: AttentionMetadata):
            kc, vc = cache
            out, kc, vc = paged_attention(q, k, v, kc, vc, layer, meta, scale=scale, impl=impl)
            return out, (kc, vc)

        ft = inputs.finetune
        out = model.hidden_states(
            token_ids, inputs.positions, inputs.adapter_ids, attend, (k_cache, v_cache),
            save_indices=None if ft is None else ft.save_slots, dropout=inputs.dropout, parallel=parallel,
            attend_inputs=inputs.attn, lora_groups=lora_groups,
        )
        loss = jnp.zeros(inputs.logits_indices.shape, jnp.float32)
        ft_logprobs = jnp.zeros((0,), jnp.float32)
        if ft is None:
            h, (k_cache, v_cache) = out
        else:
            h, (k_cache, v_cache), (saved, final) = out
            ft_buffers, loss, ft_logprobs = save_forward(
                model.config, base_weights(model), ft_buffers, ft, saved, final, inputs.logits_indices.shape[0],
                head_sizes(ft.weights.shape[0]))
        logits = model.logits(jnp.take(h, inputs.logits_indices, axis=0))  # [S, V]: last tokens only
        sp, attn = inputs.sampling, inputs.attn
        seen, processed = jax.lax.cond(
            jnp.any((sp.repetition_penalty != 1.0) & (jnp.arange(sp.row.shape[0]) < attn.num_seqs)),
            lambda m, lg: apply_repetition_penalty(m, lg, sp, token_ids, inputs.positions, attn.cu_q_lens, attn.num_seqs),
            lambda m, lg: (m, lg), seen, logits,
        )
        out = sample(logits, sp, max_logprobs, processed)
        last = jnp.zeros(prev_tokens.shape, jnp.int32).at[: out.token_ids.shape[0]].set(out.token_ids)
        result = StepOutput(out, loss, ft_logprobs, last)
        if parallel is not None:  # (the mask would otherwise follow the vocabulary-split logits)
            result, seen = jax.lax.with_sharding_constraint((result, seen), parallel.replicated)
        return k_cache, v_cache, ft_buffers, seen, result

    return step


class CompiledStep:
    """The step compiled ahead of time for every bucket.

    Args:
        model: the model (its graph is fixed; its state is passed at each call).
        buckets: the shapes to compile.
        max_pages_per_seq: page-table width (``ceil(max_model_len / page_size)``).
        k_cache, v_cache: example caches (shapes, dtypes, shardings).
        ft_buffers: example finetuning buffers, or ``None`` without finetuning.
        seen: the example seen-token mask (bool ``[rows, V]``).
        finetune_tokens: most finetuning forward tokens in a step (0 without finetuning).
        num_store_rows: rows of the activation store (the padding destination of its scatter).
        impl, max_logprobs, parallel, lora_groups: see :func:`make_step_fn`.
        cache: where compiled buckets are kept between processes
            (:class:`~coserve_jax.executable_cache.ExecutableCache`), or ``None``.
    """

    def __init__(
        self,
        model: CausalLM,
        buckets: Sequence[Bucket],
        max_pages_per_seq: int,
        k_cache: jax.Array,
        v_cache: jax.Array,
        ft_buffers: FinetuneBuffers | None = None,
        seen: jax.Array | None = None,
        *,
        finetune_tokens: int = 0,
        num_store_rows: int = 0,
        impl: str,
        max_logprobs: int,
        parallel: ShardingRules | None = None,
        cache: ExecutableCache | None = None,
        lora_groups: int = 0,
    ):
        self.graphdef, state = nnx.split(model)
        self.cache = cache
        self._name = (f"step impl={impl} max_logprobs={max_logprobs} lora_groups={lora_groups} "
                      f"mesh={None if parallel is None else dict(parallel.mesh.shape)} "
                      f"model={model_key(model, self.graphdef)}")
        self.parallel = parallel
        self.buckets = list(buckets)
        self.max_pages_per_seq = max_pages_per_seq
        self.finetune_tokens = finetune_tokens if ft_buffers is not None else 0
        self.num_store_rows = num_store_rows
        self.max_num_seqs = max(b.num_seqs for b in self.buckets)
        fn = make_step_fn(
            self.graphdef, scale=model.config.head_dim ** -0.5, impl=impl, max_logprobs=max_logprobs, parallel=parallel,
            lora_groups=lora_groups,
        )
        self._jitted = jax.jit(fn, donate_argnums=(1, 2, 3, 4))
        self.no_prev_tokens = jnp.zeros(self.max_num_seqs, jnp.int32)
        """``prev_tokens`` of a step that reads none (every ``prev_index`` is -1)."""
        if parallel is not None:
            self.no_prev_tokens = jax.device_put(self.no_prev_tokens, parallel.replicated)
        self._compiled: dict[Bucket, Any] = {}
        self._ready: tuple[Bucket, ...] = ()
        # shapes, dtypes and placements only: the arrays themselves are donated by the steps
        self._example = abstract((state, k_cache, v_cache, ft_buffers, seen))
        self.compile_seconds = 0.0

    def dims(self, bucket: Bucket) -> StepDims:
        """The sizes of :data:`~coserve_jax.engine.step_inputs.STEP_INPUT_TABLE`'s dimensions in ``bucket``."""
        return StepDims(bucket, self.max_pages_per_seq, self.max_num_seqs, self.finetune_tokens, self.num_store_rows)

    @property
    def ready(self) -> tuple[Bucket, ...]:
        """The buckets compiled so far, ascending (all of them after :meth:`compile_all`; fewer
        while a background compilation runs)."""
        return self._ready

    def compile_bucket(self, bucket: Bucket) -> None:
        """Lower and compile one bucket (an executable-cache or persistent-cache hit loads
        instead); it is in :attr:`ready` once done. Safe to call from a background thread."""
        if bucket in self._compiled:
            return
        t = time.perf_counter()
        state, k, v, ft, seen = self._example
        rep = None if self.parallel is None else self.parallel.replicated
        inputs = abstract_inputs(self.dims(bucket), rep)
        prev = jax.ShapeDtypeStruct((self.max_num_seqs,), jnp.int32, sharding=rep)
        self._compiled[bucket] = compile_ahead(self.cache, self._name, self._jitted, state, k, v, ft, seen, prev, inputs)
        self._ready = tuple(sorted(self._compiled))
        dt = time.perf_counter() - t
        self.compile_seconds += dt
        log.info("compiled step shape %d/%d (T=%d, S=%d) in %.1f s", len(self._ready), len(self.buckets),
                 bucket.num_tokens, bucket.num_seqs, dt)

    def compile_all(self) -> float:
        """Lower and compile every bucket not compiled yet. Returns the seconds spent compiling."""
        for b in self.buckets:
            self.compile_bucket(b)
        return self.compile_seconds

    def __call__(self, state, k_cache, v_cache, ft_buffers, seen, prev_tokens, inputs: StepInputs):
        """Run the compiled step of ``inputs.bucket`` (never compiles: raises ``KeyError`` for a
        bucket not compiled). Returns ``(k_cache, v_cache, ft_buffers, seen, StepOutput)``."""
        return self._compiled[inputs.bucket](state, k_cache, v_cache, ft_buffers, seen, prev_tokens, inputs)
