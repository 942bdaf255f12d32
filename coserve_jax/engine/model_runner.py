"""The one owner of device state: model weights, KV cache, finetuning buffers, every executable.

Everything that runs on the device goes through a :class:`ModelRunner`: the fused step of each
bucket, the finetuning backward slice of each length bucket, a job's optimizer step and the
write of its new weights into the adapter pool, adapter loads and unloads, the accumulator-row
reset, and the start-up latency profile. The model's ``nnx.state`` (what the compiled functions
take) is refreshed in one place, :meth:`ModelRunner.refresh_state`, after every write of the pool.
(sglang-jax's ``ModelRunner`` and vLLM's ``GPUModelRunner`` play the same part: one device owner
beside a host-side scheduler.)

What crosses into the runner is the scheduler's plain :class:`~coserve_jax.sched.outputs.SchedulerOutput`;
what comes back is a :class:`~coserve_jax.engine.step.StepOutput` of device arrays, which
:meth:`ModelRunner.fetch` turns into the plain :class:`~coserve_jax.sched.outputs.StepResult`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.step import Bucket, CompiledStep, StepOutput, model_key, pick_bucket
from coserve_jax.engine.input_batch import InputBatch
from coserve_jax.engine.sampler import init_seen_mask
from coserve_jax.engine.step_inputs import build_step_inputs, head_bucket, head_sizes
from coserve_jax.executable_cache import ExecutableCache, compile_ahead
from coserve_jax.finetune import fused
from coserve_jax.lora.manager import AdapterManager
from coserve_jax.models.decoder import CausalLM
from coserve_jax.parallel.rules import ShardingRules
from coserve_jax.sched.outputs import BackwardSlice, SchedulerOutput, StepResult, TrainSequence

log = logging.getLogger("coserve_jax.engine")


class ModelRunner:
    """Device state and executables of one engine.

    Args:
        model: the model, placed by ``rules`` (its LoRA pool, if any, is written in place).
        rules: the sharding rules of the engine's mesh.
        config: the engine's :class:`EngineConfig`.

    Attributes:
        k_cache, v_cache: ``[L, num_kv_pages, page_size, Hkv, D]`` of the model dtype, split over
            the devices by KV heads.
        ft_buffers: :class:`~coserve_jax.finetune.fused.FinetuneBuffers`, or ``None`` without
            finetuning.
        adapters: the :class:`~coserve_jax.lora.manager.AdapterManager` of the pool, or ``None``.
        compile_seconds: seconds :meth:`compile` took (persistent-cache hits included).
        executable_cache: the :class:`~coserve_jax.executable_cache.ExecutableCache` under
            ``<compilation_cache_dir>/executables`` (one process only), or ``None``.
        optimizers: job id -> the job's compiled optimizer step (:meth:`compile_optimizer`).
    """

    def __init__(self, model: CausalLM, rules: ShardingRules, config: EngineConfig):
        self.model = model
        self.rules = rules
        self.config = config
        mc = model.config
        dtype = model.dtype
        shape = (mc.num_layers, config.num_kv_pages, config.page_size, rules.kv_cache_heads, mc.head_dim)
        self.k_cache = rules.zeros(shape, dtype, rules.kv_cache_spec())
        self.v_cache = rules.zeros(shape, dtype, rules.kv_cache_spec())
        self.executable_cache = None
        if config.compilation_cache_dir is not None and jax.process_count() == 1:
            devices = list(rules.mesh.devices.flat)
            self.executable_cache = ExecutableCache(os.path.join(config.compilation_cache_dir, "executables"), devices)
        self.adapters = AdapterManager(model, self.executable_cache) if model.lora is not None else None
        self.ft_buffers = None
        if config.finetune is not None:
            self.ft_buffers = fused.init_buffers(mc, model.lora.config, config.finetune, dtype, rules)
        self.state = nnx.state(model)
        self.optimizers: dict[str, jax.stages.Compiled] = {}
        self.input_batch = InputBatch(config.max_pages_per_seq, 2 * config.max_num_seqs)
        """The running requests' page tables and settings, kept between steps (plans carry increments)."""
        self.num_rows = len(self.input_batch.num_pages)
        self.seen = jax.device_put(init_seen_mask(self.num_rows, mc.vocab_size), rules.replicated)
        """The repetition penalty's seen-token mask, bool ``[rows, V]`` by input-batch row."""
        self.step_fn = CompiledStep(
            model, config.buckets, config.max_pages_per_seq, self.k_cache, self.v_cache, self.ft_buffers, self.seen,
            finetune_tokens=config.max_finetune_tokens, num_store_rows=config.finetune_rows,
            impl=config.attention_impl, max_logprobs=config.max_logprobs, parallel=rules, cache=self.executable_cache,
        )
        self._last_tokens = self.step_fn.no_prev_tokens  # the last step's sampled tokens [M]
        self._last_plan: SchedulerOutput | None = None
        self.backward: dict[int, object] = {}
        self.train: dict[int, object] = {}
        self._zero_row = None
        self.compile_seconds = 0.0

    # ---- start-up ------------------------------------------------------------------------
    def compile(self) -> float:
        """Compile every executable ahead of time (loads from the persistent cache when it
        holds them), so no serving step compiles. Returns the seconds it took."""
        t0 = time.perf_counter()
        self.step_fn.compile_all()
        layout = self.config.finetune
        cache = self.executable_cache
        if layout is not None:
            graphdef = self.step_fn.graphdef
            model = f"{model_key(self.model, graphdef)} {layout!r}"
            for i, length in enumerate(layout.seq_buckets, 1):
                t = time.perf_counter()
                fn = jax.jit(fused.make_backward_fn(graphdef, self.model.config, layout, length, self.rules), donate_argnums=1)
                self.backward[length] = compile_ahead(
                    cache, f"backward length={length} mesh={dict(self.rules.mesh.shape)} {model}", fn, self.state, self.ft_buffers,
                    fused.abstract_backward_inputs(length, self.rules.replicated),
                )
                log.info("compiled backward %d/%d (sequence length %d) in %.1f s", i, len(layout.seq_buckets),
                         length, time.perf_counter() - t)
            if self.config.finetune_idle_train_step:
                for i, length in enumerate(layout.seq_buckets, 1):
                    t = time.perf_counter()
                    fn = jax.jit(fused.make_train_fn(graphdef, self.model.config, length, head_sizes(length)), donate_argnums=1)
                    self.train[length] = compile_ahead(
                        cache, f"train length={length} {model}", fn, self.state, self.ft_buffers,
                        fused.abstract_train_inputs(length),
                    )
                    log.info("compiled idle train step %d/%d (sequence length %d) in %.1f s", i, len(layout.seq_buckets),
                             length, time.perf_counter() - t)
            self._zero_row = compile_ahead(cache, "zero_row", fused.zero_row, self.ft_buffers.grads,
                                           jax.ShapeDtypeStruct((), jnp.int32))
            self.adapters.compile_writer()
        self.compile_seconds = time.perf_counter() - t0
        if cache is not None:
            log.info("executables: %d loaded from %s, %d compiled", cache.hits, cache.path, cache.misses)
        return self.compile_seconds

    def refresh_state(self) -> None:
        """Re-read the model's state after its adapter pool was written (the one place)."""
        self.state = nnx.state(self.model)

    # ---- the step ------------------------------------------------------------------------
    def bucket_for(self, plan: SchedulerOutput) -> Bucket:
        """The compiled bucket a plan runs in."""
        return pick_bucket(self.config.buckets, plan.num_tokens, plan.num_seqs)

    def execute(self, plan: SchedulerOutput) -> StepOutput | None:
        """Apply a plan's page-table increments and dispatch its fused step (asynchronously:
        nothing waits). Every plan goes through here, in order, those without tokens included.

        A :data:`~coserve_jax.sched.outputs.PENDING_TOKEN` in the plan is read on the device
        from the previous executed step's sampled tokens.

        Returns:
            the step's :class:`~coserve_jax.engine.step.StepOutput` (device arrays), or
            ``None`` for a plan without tokens.
        Raises:
            KeyError: a pending token of a request that did not sample in the previous step.
        """
        if not plan.num_tokens:
            self.input_batch.release(plan.finished)
            self.input_batch.release(plan.preempted)
            return None
        cfg = self.config
        prev_slots = None
        if plan.has_pending_tokens:
            last = self._last_plan
            prev_slots = {}
            if last is not None:  # every decode samples; of the prefills, those that reach their end
                n_dec = len(last.decodes.request_ids)
                prev_slots = dict(zip(last.decodes.request_ids, range(n_dec)))
                prev_slots.update((c.request_id, n_dec + j) for j, c in enumerate(last.prefills) if c.sample)
        rows = self.input_batch.apply(plan)
        if len(self.input_batch.num_pages) != self.num_rows:  # never: at most max_num_seqs requests hold rows
            raise RuntimeError(f"the input batch outgrew the {self.num_rows} rows of the seen-token mask")
        inputs = build_step_inputs(
            plan, self.step_fn.dims(self.bucket_for(plan)), cfg.page_size, self.input_batch, rows, prev_slots,
        )
        self.k_cache, self.v_cache, self.ft_buffers, self.seen, out = self.step_fn(
            self.state, self.k_cache, self.v_cache, self.ft_buffers, self.seen, self._last_tokens, inputs
        )
        self._last_tokens, self._last_plan = out.last_tokens, plan
        return out

    def run_backward(self, b: BackwardSlice) -> None:
        """Dispatch the backward layers of a training sequence (accumulates into its job's row)."""
        length = self.config.finetune.bucket_for(b.num_tokens)
        positions, segment_ids, seeds = _pack_rows(b.segments, b.dropout_seeds, length)
        inputs = fused.BackwardInputs(
            np.int32(b.store_row), np.int32(b.grad_row), np.int32(b.adapter_index), np.int32(b.first_layer),
            np.int32(b.num_layers), np.float32(b.dropout_rate), positions, segment_ids, seeds,
        )
        self.ft_buffers = self.backward[length](self.state, self.ft_buffers, inputs)

    def run_train(self, t: TrainSequence) -> jax.Array:
        """Dispatch a whole training sequence's train step (its gradient added into its job's
        row). Returns its summed weighted loss (a device scalar)."""
        length = self.config.finetune.bucket_for(t.num_tokens)
        n = t.num_tokens
        tokens, targets = np.zeros(length, np.int32), np.zeros(length, np.int32)
        weights = np.zeros(length, np.float32)
        tokens[:n], targets[:n], weights[:n] = t.token_ids, t.targets, t.weights
        positions, segment_ids, seeds = _pack_rows(t.segments, t.dropout_seeds, length)
        heads = np.flatnonzero(weights)
        head_index = np.full(length, length, np.int32)
        head_index[: len(heads)] = heads
        inputs = fused.TrainInputs(
            tokens, targets, weights, positions, segment_ids, seeds, head_index, np.int32(head_bucket(len(heads), length)),
            np.int32(t.grad_row), np.int32(t.adapter_index), np.float32(t.dropout_rate),
        )
        self.ft_buffers, loss = self.train[length](self.state, self.ft_buffers, inputs)
        return loss

    def wait(self, out=None) -> None:
        """Block until the dispatched work (``out`` and the finetuning buffers) is done."""
        jax.block_until_ready((out, self.ft_buffers))

    @staticmethod
    def fetch(plan: SchedulerOutput, out: StepOutput) -> StepResult:
        """A step's results as plain data (this waits for the step). Logprob arrays are copied
        from the device only when a chunk of the plan asks for them.

        Returns:
            :class:`~coserve_jax.sched.outputs.StepResult`, one entry per inference chunk.
        """
        n_dec = len(plan.decodes.request_ids)
        tokens = np.asarray(out.sampler.token_ids).tolist()
        sampled = tokens[:n_dec] + [tokens[n_dec + j] if c.sample else None for j, c in enumerate(plan.prefills)]
        logprobs = top = None
        k_max = plan.max_num_logprobs
        if k_max is not None:
            asks = plan.num_logprobs()
            chosen = np.asarray(out.sampler.logprobs).tolist()
            logprobs = [chosen[i] if k is not None else None for i, k in enumerate(asks)]
            if k_max > 0:
                ids = np.asarray(out.sampler.top_ids)[:, :k_max].tolist()
                lps = np.asarray(out.sampler.top_logprobs)[:, :k_max].tolist()
                top = [dict(zip(ids[i][:k], lps[i][:k])) if k else None for i, k in enumerate(asks)]
        losses = None
        if plan.finetune:
            by_seq = np.asarray(out.ft_loss).tolist()
            n_inf = plan.num_inference_seqs
            losses = by_seq[n_inf:n_inf + len(plan.finetune)]
        return StepResult(sampled, logprobs, top, losses)

    # ---- finetuning and adapters -----------------------------------------------------------
    def zero_grad_row(self, row: int) -> None:
        """Zero a job's gradient-accumulator row (a new job taking it)."""
        self.ft_buffers = self.ft_buffers._replace(grads=self._zero_row(self.ft_buffers.grads, np.int32(row)))

    def compile_optimizer(self, job, update_fn) -> None:
        """Compile a job's optimizer step ahead of time (so no serving step compiles), kept in
        :attr:`optimizers` under the job's id until :meth:`release_optimizer`.

        Args:
            job: the :class:`~coserve_jax.finetune.job.FinetuneJob` (its placed master weights
                and optimizer state give the shapes and shardings).
            update_fn: the pure step of :func:`~coserve_jax.finetune.optim.make_update_fn`.

        The new weights, optimizer state and accumulators must come back placed as they went in
        (the next step's compiled inputs), and the slot weights as the pool's writer takes them
        (:meth:`~coserve_jax.lora.manager.AdapterManager.slot_shardings`); where XLA's
        propagation chose otherwise (under tensor parallelism it may replicate an output), the
        step is compiled again with those outputs pinned.
        """
        args = (job.params, job.opt_state, self.ft_buffers.grads, np.int32(0), np.int32(0))
        compiled = jax.jit(update_fn, donate_argnums=(2,)).lower(*args).compile()
        outs = tuple(compiled.output_shardings)
        want = [jax.tree.map(lambda a: a.sharding, x) for x in args[:3]]
        want += [self.adapters.slot_shardings(), *outs[4:]]
        mesh_sharding = next(iter(jax.tree.leaves(want[0])))
        if isinstance(mesh_sharding, jax.sharding.NamedSharding):  # (one device: nothing to pin)
            rep = jax.sharding.NamedSharding(mesh_sharding.mesh, jax.sharding.PartitionSpec())
            devices = mesh_sharding.device_set
            want = jax.tree.map(lambda o: o if o.device_set == devices else rep, tuple(want))
            out_struct = jax.eval_shape(update_fn, *args)
            same = all(
                o.is_equivalent_to(w, x.ndim)
                for o, w, x in zip(jax.tree.leaves(outs), jax.tree.leaves(want), jax.tree.leaves(out_struct))
            )
            if not same:
                compiled = jax.jit(update_fn, donate_argnums=(2,), out_shardings=want).lower(*args).compile()
        self.optimizers[job.id] = compiled

    def release_optimizer(self, job_id: str) -> None:
        """Drop an ended job's optimizer executable (unknown ids are ignored)."""
        self.optimizers.pop(job_id, None)

    def optimizer_step(self, job) -> None:
        """Run ``job``'s optimizer step on its accumulated gradient (zeroing its accumulator
        row), hand the job its new master weights and optimizer state
        (:meth:`~coserve_jax.finetune.job.FinetuneJob.record_optimizer_step`), and write the new
        weights into its adapter slot."""
        params, opt_state, grads, pool, norm, lr = self.optimizers[job.id](
            job.params, job.opt_state, self.ft_buffers.grads, np.int32(job.grad_row), np.int32(job.step)
        )
        self.ft_buffers = self.ft_buffers._replace(grads=grads)
        self.adapters.write_weights(job.adapter_index, pool)
        self.refresh_state()
        job.record_optimizer_step(params, opt_state, norm, lr)

    def load_adapter(self, name: str, source) -> None:
        """Load an adapter into a free slot (:meth:`AdapterManager.load`)."""
        self.adapters.load(name, source)
        self.refresh_state()

    def unload_adapter(self, name: str) -> None:
        """Empty an adapter's slot (:meth:`AdapterManager.unload`)."""
        self.adapters.unload(name)
        self.refresh_state()

    def place_job_params(self, params: dict) -> dict:
        """A job's master weights placed as its pool slot (dependent parallelization); its
        optimizer state, made from them, follows."""
        rules = self.rules
        return jax.device_put(params, {m: {w: rules.named(rules.job_lora_spec(m, w)) for w in ws} for m, ws in params.items()})


def _pack_rows(segments, dropout_seeds, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a sequence padded to ``length``: its position in its example (int32), its
    example (int32, -1 for padding) and that example's dropout seed (uint32)."""
    positions = np.zeros(length, np.int32)
    segment_ids = np.full(length, -1, np.int32)
    seeds = np.zeros(length, np.uint32)
    at = 0
    for i, (n, seed) in enumerate(zip(segments, dropout_seeds)):
        positions[at:at + n] = np.arange(n)
        segment_ids[at:at + n] = i
        seeds[at:at + n] = seed
        at += n
    return positions, segment_ids, seeds
