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

import atexit
import functools
import logging
import os
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.step import Bucket, CompiledStep, StepOutput, abstract, model_key, pick_bucket
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
        abstract_only: ``model`` is abstract (:func:`~coserve_jax.models.loader.init_abstract`)
            and nothing is allocated: only :meth:`compile` may be called (:func:`compile_abstract`).

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

    def __init__(self, model: CausalLM, rules: ShardingRules, config: EngineConfig, *, abstract_only: bool = False):
        self.model = model
        self.rules = rules
        self.config = config
        mc = model.config
        dtype = model.dtype
        shape = (mc.num_layers, config.num_kv_pages, config.page_size, rules.kv_cache_heads, mc.head_dim)
        # abstract_only: shapes, dtypes and placements, nothing allocated (compile-only use)
        make = jax.eval_shape if abstract_only else (lambda f: f())
        self.k_cache = make(lambda: rules.zeros(shape, dtype, rules.kv_cache_spec()))
        self.v_cache = make(lambda: rules.zeros(shape, dtype, rules.kv_cache_spec()))
        self.executable_cache = None
        if config.compilation_cache_dir is not None and jax.process_count() == 1:
            devices = list(rules.mesh.devices.flat)
            self.executable_cache = ExecutableCache(os.path.join(config.compilation_cache_dir, "executables"), devices)
        self.adapters = AdapterManager(model, self.executable_cache) if model.lora is not None else None
        self.ft_buffers = None
        if config.finetune is not None:
            self.ft_buffers = make(lambda: fused.init_buffers(mc, model.lora.config, config.finetune, dtype, rules))
        self.state = nnx.state(model)
        self.optimizers: dict[str, jax.stages.Compiled] = {}
        self.input_batch = InputBatch(config.max_pages_per_seq, 2 * config.max_num_seqs)
        """The running requests' page tables and settings, kept between steps (plans carry increments)."""
        self.num_rows = len(self.input_batch.num_pages)
        self.seen = make(lambda: jax.device_put(init_seen_mask(self.num_rows, mc.vocab_size), rules.replicated))
        """The repetition penalty's seen-token mask, bool ``[rows, V]`` by input-batch row."""
        self.step_fn = CompiledStep(
            model, config.buckets, config.max_pages_per_seq, self.k_cache, self.v_cache, self.ft_buffers, self.seen,
            finetune_tokens=config.max_finetune_tokens, num_store_rows=config.finetune_rows,
            impl=config.attention_impl, max_logprobs=config.max_logprobs, parallel=rules, cache=self.executable_cache,
            lora_groups=config.lora_groups,
        )
        self._last_tokens = self.step_fn.no_prev_tokens  # the last step's sampled tokens [M]
        self._last_plan: SchedulerOutput | None = None
        self.backward: dict[int, object] = {}
        self.train: dict[int, object] = {}
        self._zero_row = None
        self._backward_lengths: tuple[int, ...] = ()  # compiled so far, ascending
        self._train_lengths: tuple[int, ...] = ()
        # what the executables are compiled for (shapes and placements: the arrays get donated)
        self._abstract_state = abstract((self.state, self.ft_buffers))
        self._background: threading.Thread | None = None
        self._stop = threading.Event()
        self._at_exit = None
        self.background_error: BaseException | None = None
        """What stopped a background compilation (``None``: nothing)."""
        self.compile_seconds = 0.0

    # ---- start-up ------------------------------------------------------------------------
    def compile(self, background: bool = False) -> float:
        """Compile every executable ahead of time (loading those the executable cache or the
        persistent compilation cache holds), so that no serving step compiles.

        Args:
            background: compile first only what serving needs to start (the largest step
                bucket, the longest backward, the accumulator reset and the adapter writer) and
                the rest in a background thread: until a smaller shape is compiled, plans run in
                the smallest compiled one that holds them (padded), and steps without inference
                run training sequences as forward chunks and backwards until the longest idle
                train step is compiled. :meth:`wait_compiled` waits for the rest.
        Returns:
            the seconds it took (before returning: the foreground part).
        """
        t0 = time.perf_counter()
        first, rest = self._compile_tasks()
        if not background:
            first, rest = first + rest, []
        for task in first:
            task()
        self.compile_seconds = time.perf_counter() - t0
        if rest:
            log.info("serving with %d executables; compiling %d more in the background", len(first), len(rest))
            # At interpreter exit the thread is stopped between executables and joined: a daemon
            # thread killed inside XLA's compiler aborts the process.
            self._at_exit = functools.partial(_stop_background, weakref.ref(self))
            atexit.register(self._at_exit)
            self._background = threading.Thread(target=self._compile_rest, args=(rest, t0), name="coserve-compile", daemon=True)
            self._background.start()
        else:
            self._log_cache()
        return self.compile_seconds

    def _compile_tasks(self) -> tuple[list, list]:
        """The compilations to do, as ``(needed to serve, the rest)`` lists of callables, in order."""
        buckets = list(self.config.buckets)
        first = [functools.partial(self.step_fn.compile_bucket, buckets[-1])]
        rest = [functools.partial(self.step_fn.compile_bucket, b) for b in buckets[:-1]]
        layout = self.config.finetune
        if layout is not None:
            lengths = list(layout.seq_buckets)
            first.append(functools.partial(self._compile_backward, lengths[-1]))
            first.append(self._compile_small)
            if self.config.finetune_idle_train_step:  # the longest first: then every sequence has one
                rest.extend(functools.partial(self._compile_train, n) for n in lengths[::-1])
            rest.extend(functools.partial(self._compile_backward, n) for n in lengths[:-1])
        return first, rest

    def _compile_rest(self, tasks: list, t0: float) -> None:
        try:
            for task in tasks:
                if self._stop.is_set():
                    log.info("background compilation stopped")
                    return
                task()
        except BaseException as e:  # the engine goes on with what is compiled
            self.background_error = e
            log.exception("background compilation failed; serving goes on with the executables compiled so far")
            return
        finally:
            atexit.unregister(self._at_exit)
        log.info("background compilation done: every executable ready %.1f s after start-up began", time.perf_counter() - t0)
        self._log_cache()

    def stop_compiling(self, timeout: float | None = None) -> None:
        """Stop a background compilation after the executable in progress (waits for it, up to
        ``timeout`` seconds); what is compiled stays usable."""
        self._stop.set()
        if self._background is not None:
            self._background.join(timeout)

    def _log_cache(self) -> None:
        cache = self.executable_cache
        if cache is not None:
            log.info("executables: %d loaded from %s, %d compiled", cache.hits, cache.path, cache.misses)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until a background compilation (:meth:`compile`) is done. Returns whether every
        executable is compiled (``False``: the timeout passed, or the compilation failed:
        :attr:`background_error`)."""
        if self._background is not None:
            self._background.join(timeout)
            if self._background.is_alive():
                return False
        return self.background_error is None

    @property
    def compiling(self) -> bool:
        """A background compilation is still running."""
        return self._background is not None and self._background.is_alive()

    def _model_name(self) -> str:
        return f"{model_key(self.model, self.step_fn.graphdef)} {self.config.finetune!r}"

    def _compile_backward(self, length: int) -> None:
        t = time.perf_counter()
        layout = self.config.finetune
        fn = jax.jit(fused.make_backward_fn(self.step_fn.graphdef, self.model.config, layout, length, self.rules),
                     donate_argnums=1)
        state, buffers = self._abstract_state
        self.backward[length] = compile_ahead(
            self.executable_cache, f"backward length={length} mesh={dict(self.rules.mesh.shape)} {self._model_name()}",
            fn, state, buffers, fused.abstract_backward_inputs(length, self.rules.replicated),
        )
        self._backward_lengths = tuple(sorted(self.backward))
        log.info("compiled backward %d/%d (sequence length %d) in %.1f s", len(self.backward), len(layout.seq_buckets),
                 length, time.perf_counter() - t)

    def _compile_train(self, length: int) -> None:
        t = time.perf_counter()
        layout = self.config.finetune
        fn = jax.jit(fused.make_train_fn(self.step_fn.graphdef, self.model.config, length, head_sizes(length)),
                     donate_argnums=1)
        state, buffers = self._abstract_state
        self.train[length] = compile_ahead(
            self.executable_cache, f"train length={length} {self._model_name()}", fn, state, buffers,
            fused.abstract_train_inputs(length),
        )
        self._train_lengths = tuple(sorted(self.train))
        log.info("compiled idle train step %d/%d (sequence length %d) in %.1f s", len(self.train),
                 len(layout.seq_buckets), length, time.perf_counter() - t)

    def _compile_small(self) -> None:
        """The accumulator-row reset and the adapter pool's writer."""
        self._zero_row = compile_ahead(self.executable_cache, "zero_row", fused.zero_row, self._abstract_state[1].grads,
                                       jax.ShapeDtypeStruct((), jnp.int32))
        self.adapters.compile_writer()

    @property
    def idle_train_ready(self) -> bool:
        """An idle train step holds every training sequence (its longest length is compiled)."""
        layout = self.config.finetune
        return layout is not None and layout.seq_buckets[-1] in self.train

    @staticmethod
    def _smallest(lengths: tuple[int, ...], n: int, what: str) -> int:
        for length in lengths:
            if length >= n:
                return length
        raise RuntimeError(f"no compiled {what} holds {n} tokens (compiled: {list(lengths)})")

    def refresh_state(self) -> None:
        """Re-read the model's state after its adapter pool was written (the one place)."""
        self.state = nnx.state(self.model)

    # ---- the step ------------------------------------------------------------------------
    def bucket_for(self, plan: SchedulerOutput) -> Bucket:
        """The compiled bucket a plan runs in."""
        return pick_bucket(self.step_fn.ready, plan.num_tokens, plan.num_seqs)

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
        length = self._smallest(self._backward_lengths, b.num_tokens, "backward")
        positions, segment_ids, seeds = _pack_rows(b.segments, b.dropout_seeds, length)
        inputs = fused.BackwardInputs(
            np.int32(b.store_row), np.int32(b.grad_row), np.int32(b.adapter_index), np.int32(b.first_layer),
            np.int32(b.num_layers), np.float32(b.dropout_rate), positions, segment_ids, seeds,
        )
        self.ft_buffers = self.backward[length](self.state, self.ft_buffers, inputs)

    def run_train(self, t: TrainSequence) -> tuple[jax.Array, jax.Array]:
        """Dispatch a whole training sequence's train step (its gradient added into its job's
        row). Returns its summed weighted loss (a device scalar) and its rows' target logprobs
        (float32 ``[N]`` of its length bucket, a device array; 0 off the loss head's rows)."""
        length = self._smallest(self._train_lengths, t.num_tokens, "train step")
        n = t.num_tokens
        tokens, targets = np.zeros(length, np.int32), np.zeros(length, np.int32)
        weights = np.zeros(length, np.float32)
        tokens[:n], targets[:n], weights[:n] = t.token_ids, t.targets, t.weights
        loss_code = np.zeros(length, np.int32)
        loss_params = np.zeros((length, 3), np.float32)
        if t.loss_code:
            loss_code[:n] = t.loss_code
            loss_params[:n, 0] = t.sampler_logprobs
            loss_params[:n, 1:] = t.clip
        positions, segment_ids, seeds = _pack_rows(t.segments, t.dropout_seeds, length)
        head = weights != 0
        head[:n] |= t.return_logprobs
        heads = np.flatnonzero(head)
        head_index = np.full(length, length, np.int32)
        head_index[: len(heads)] = heads
        inputs = fused.TrainInputs(
            tokens, targets, weights, loss_code, loss_params, positions, segment_ids, seeds, head_index,
            np.int32(head_bucket(len(heads), length)), np.int32(t.grad_row), np.int32(t.adapter_index),
            np.float32(t.dropout_rate),
        )
        self.ft_buffers, loss, logprobs = self.train[length](self.state, self.ft_buffers, inputs)
        return loss, logprobs

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


def _stop_background(ref: weakref.ref) -> None:
    """At interpreter exit: stop and join a runner's background compilation (if it still exists)."""
    runner = ref()
    if runner is not None:
        runner.stop_compiling()


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


def compile_abstract(model: CausalLM, knobs: dict, cache_dir: str | os.PathLike | None = None) -> dict:
    """Compile an engine's executables for an abstract model (no weights, caches or buffers
    allocated), e.g. at Llama-3.1-8B shape on a machine that cannot hold it, on one device.

    Args:
        model: from :func:`~coserve_jax.models.loader.init_abstract` (with its LoRA pool).
        knobs: the engine's knobs (``EngineConfig.resolve`` arguments); ``num_kv_pages``
            defaults to 1024 (it sizes the KV cache arguments only).
        cache_dir: the compilation cache directory (the executable cache goes beneath it), or
            ``None``: no caches.
    Returns:
        ``{"step_buckets", "backward_buckets", "train_steps", "executables_loaded",
        "executables_compiled"}`` (counts).
    """
    from coserve_jax.engine.step import configure_compilation_cache
    from coserve_jax.parallel.mesh import make_mesh

    configure_compilation_cache(cache_dir)
    rules = ShardingRules(model.config, make_mesh(1))
    pool = model.lora.config if model.lora is not None else None
    knobs = dict(knobs)
    knobs.setdefault("num_kv_pages", 1024)
    if pool is not None:
        knobs.update(max_loras=pool.max_loras, max_lora_rank=pool.max_lora_rank, lora_target_modules=pool.target_modules)
    config = EngineConfig.resolve(
        model.config, has_lora_pool=pool is not None, kv_cache_heads=rules.kv_cache_heads,
        dtype_itemsize=jnp.dtype(model.dtype).itemsize, compilation_cache_dir=cache_dir, **knobs,
    )
    runner = ModelRunner(model, rules, config, abstract_only=True)
    runner.compile()
    cache = runner.executable_cache
    return {
        "step_buckets": len(runner.step_fn.ready), "backward_buckets": len(runner.backward), "train_steps": len(runner.train),
        "executables_loaded": cache.hits if cache else 0, "executables_compiled": cache.misses if cache else None,
    }
