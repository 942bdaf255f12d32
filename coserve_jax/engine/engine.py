"""The notebook-facing inference engine (vLLM's ``LLM`` / ``LLMEngine`` in one class): a facade.

``Engine`` builds the parts and drives them; each is its own module:

* :class:`~coserve_jax.engine.config.EngineConfig`: every resolved limit, bucket grid and layout;
* :class:`~coserve_jax.sched.scheduler.Scheduler` (host, pure Python): what each step computes,
  as a plain :class:`~coserve_jax.sched.outputs.SchedulerOutput`;
* :class:`~coserve_jax.engine.model_runner.ModelRunner`: the one owner of device state and
  executables (step, backward, optimizer step, adapter slots, profile);
* :class:`~coserve_jax.engine.finetune_service.FinetuneService`: finetuning jobs' lifecycle;
* :class:`~coserve_jax.engine.output_processor.OutputProcessor`: tokens into
  :class:`RequestOutput` s (detokenizing, stop strings, logprobs, finishing);
* :class:`~coserve_jax.engine.policy_runtime.PolicyRuntime`: the step policy in use, the
  latency model it predicts with, and the measured steps;
* :class:`~coserve_jax.engine.offline.OfflineAPI`: ``generate``, ``chat``, ``stream``,
  ``wait_for``, ``evaluate``: loops over :meth:`Engine.step`.

One :meth:`Engine.step` is five numbered stages: schedule, execute, train, update, process
outputs; with ``async_scheduling`` stages 4-5 read the previous step, so the host plans step
N+1 while the device runs step N. Finetuning jobs (:meth:`Engine.create_finetuning_job`) ride in the same steps.

Multi-host: :meth:`Engine.lead` (process 0) publishes every plan and device-changing call;
:meth:`Engine.follow` (the other processes) runs them.

Not thread-safe: one thread drives an engine (the server runs it in its own loop thread).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from coserve_jax.engine.adapter_cache import AdapterCache
from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.finetune_service import FinetuneService
from coserve_jax.engine.input_processor import InputProcessor, Prompt
from coserve_jax.engine.loading import load_engine_model
from coserve_jax.engine.model_runner import ModelRunner
from coserve_jax.engine.offline import OfflineAPI
from coserve_jax.engine.output_processor import OutputProcessor
from coserve_jax.engine.outputs import RequestOutput
from coserve_jax.engine.policy_runtime import PolicyRuntime
from coserve_jax.engine.step import Bucket, configure_compilation_cache
from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import FinetuneError, FinetuneJob
from coserve_jax.finetune.training_run import TrainingRun
from coserve_jax.lora.manager import AdapterError, AdapterManager
from coserve_jax.lora.peft_io import LoRAWeights
from coserve_jax.models.config import LINEAR_MODULES
from coserve_jax.models.decoder import CausalLM
from coserve_jax.parallel.channel import HostChannel
from coserve_jax.parallel.distributed import DistributedConfig, initialize_distributed
from coserve_jax.parallel.mesh import make_mesh
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.outputs import SchedulerOutput
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.policy import SLOConfig
from coserve_jax.sched.request import ADAPTER_PENDING, Request
from coserve_jax.sched.scheduler import Scheduler

log = logging.getLogger("coserve_jax.engine")

DEFAULT_CACHE_DIR = os.environ.get("COSERVE_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "coserve_jax", "xla"))


# Engine's keyword arguments that EngineConfig.resolve takes as they are
_KNOBS = frozenset(inspect.signature(EngineConfig.resolve).parameters) - {"cls", "model_config"}


def _attr(part: str, name: str, doc: str) -> property:
    """A read-only attribute of the engine that is attribute ``name`` of its part ``part``."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class Engine(OfflineAPI):
    """Continuous-batching LLM inference with paged attention and multi-LoRA.

    Args:
        model: a local Hugging Face checkpoint directory (Llama / Qwen2 / Mistral), a llama.cpp
            ``.gguf`` file (llama / qwen2; dequantized to ``dtype``, :mod:`coserve_jax.models.gguf`),
            or a built :class:`CausalLM` (then ``dtype``, ``max_loras`` ... of the model are used
            as built).
        tokenizer: a tokenizer directory (or ``.gguf`` file), a ``transformers`` tokenizer, or
            ``None``: the model's own tokenizer (directory files or GGUF metadata) if it has one,
            else token ids only (``.text`` stays empty).
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"``, ``"float32"``.
        **knobs: the engine's limits and policies, each documented (with its default) in
            :meth:`EngineConfig.resolve <coserve_jax.engine.config.EngineConfig.resolve>`, under
            vLLM's names where vLLM has the knob: ``max_model_len``, ``max_num_seqs``,
            ``max_num_batched_tokens``, ``page_size``, ``num_kv_pages``,
            ``kv_cache_memory_fraction``, ``max_loras``, ``max_cpu_loras``, ``max_loras_per_batch``
            (SGLang's name), ``lora_impl``, ``max_lora_rank``,
            ``lora_target_modules``, ``max_logprobs``, ``token_buckets``, ``seq_buckets``,
            ``attention_impl``, ``compilation_cache_dir`` (default ``$COSERVE_JAX_CACHE_DIR``
            or ``~/.cache/coserve_jax/xla``), ``seed``, ``watermark_pages``,
            ``max_finetune_jobs``, ``finetune_max_seq_len``, ``max_finetune_tokens``,
            ``finetune_layers_per_slice``, ``finetune_seq_buckets``, ``finetune_activation_bytes``,
            ``finetune_idle_train_step``, ``compile_in_background``, ``enable_prefix_caching``
            (on by default), ``scheduling_policy``,
            ``policy_options``, ``slo``, ``measure_steps``, ``async_scheduling`` (on by
            default: the host plans step N+1 while the device runs step N),
            ``tensor_parallel_size``.
        distributed: multi-host: a :class:`~coserve_jax.parallel.distributed.DistributedConfig`
            (or a dict of its fields: ``coordinator_address``, ``num_processes``,
            ``process_id``) passed to ``jax.distributed.initialize`` before any device is used.
            Every process then runs the same engine on the same requests.
    Raises:
        ValueError: inconsistent limits (e.g. a cache too small for one ``max_model_len``
            sequence), or a ``tensor_parallel_size`` the model's heads or MLP width do not divide.
        FileNotFoundError, UnsupportedConfigError, CheckpointError: from loading the model.

    Example::

        engine = Engine(model="/models/llama-3.1-8b", max_num_seqs=64)
        [out] = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
        print(out.text)
    """

    def __init__(
        self,
        model: str | os.PathLike | CausalLM,
        *,
        tokenizer=None,
        dtype="auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        page_size: int = 16,
        num_kv_pages: int | None = None,
        kv_cache_memory_fraction: float = 0.9,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_loras_per_batch: int | None = None,
        lora_impl: str = "segmented",
        max_lora_rank: int = 16,
        lora_target_modules: Sequence[str] = LINEAR_MODULES,
        max_logprobs: int = 20,
        token_buckets: Sequence[int] | None = None,
        seq_buckets: Sequence[int] | None = None,
        attention_impl: str = "auto",
        compilation_cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        seed: int = 0,
        watermark_pages: int | None = None,
        max_finetune_jobs: int = 1,
        finetune_max_seq_len: int | None = None,
        max_finetune_tokens: int | None = None,
        finetune_layers_per_slice: int = 1,
        finetune_seq_buckets: Sequence[int] | None = None,
        finetune_activation_bytes: int | None = None,
        finetune_idle_train_step: bool = True,
        compile_in_background: bool = False,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fixed",
        policy_options: dict | None = None,
        slo: SLOConfig | dict | None = None,
        measure_steps: bool = False,
        async_scheduling: bool = True,
        tensor_parallel_size: int = 1,
        distributed: DistributedConfig | dict | None = None,
    ):
        initialize_distributed(distributed)
        configure_compilation_cache(compilation_cache_dir)
        self.mesh = make_mesh(tensor_parallel_size)
        loaded = load_engine_model(
            model, self.mesh, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, max_loras=max_loras,
            max_lora_rank=max_lora_rank, lora_target_modules=lora_target_modules, cache_dir=compilation_cache_dir,
        )
        self.model, self.rules, self.model_path = loaded.model, loaded.rules, loaded.path
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        self.config = config = self.model.config
        """The model's :class:`~coserve_jax.models.config.ModelConfig`."""
        pool = self.model.lora.config if self.model.lora is not None else None
        knobs = {k: v for k, v in locals().items() if k in _KNOBS}  # the arguments above, as passed
        if pool is not None:  # a built model's pool decides the adapter limits
            knobs.update(max_loras=pool.max_loras, max_lora_rank=pool.max_lora_rank, lora_target_modules=pool.target_modules)
        else:
            knobs.update(max_loras=0, lora_target_modules=tuple(lora_target_modules))
        self.engine_config = ec = EngineConfig.resolve(
            config, has_lora_pool=pool is not None, kv_cache_heads=self.rules.kv_cache_heads,
            dtype_itemsize=jnp.dtype(self.model.dtype).itemsize, device_memory=self.mesh.local_devices[0].memory_stats(),
            **knobs,
        )
        """Every resolved limit, bucket grid and layout (:class:`~coserve_jax.engine.config.EngineConfig`)."""
        self.scheduler = Scheduler(ec.scheduler_config(), KVCacheManager(
            ec.num_kv_pages, ec.page_size, enable_prefix_caching=ec.enable_prefix_caching))
        self.runner = ModelRunner(self.model, self.rules, ec)
        if self.runner.adapters is not None:  # (a plain list the adapter manager bumps on every slot write)
            self.scheduler.adapter_versions = self.runner.adapters.versions
        """The device owner (:class:`~coserve_jax.engine.model_runner.ModelRunner`)."""
        log.info("model %s: %s parameters, %s, context %d tokens; KV cache %d pages of %d tokens (%.1f MiB a device); "
                 "compiling %d step shapes", self.model_path or "(built in code)", f"{config.num_params():,}",
                 jnp.dtype(self.model.dtype).name, ec.max_model_len, ec.num_kv_pages, ec.page_size, ec.kv_cache_bytes / 2**20,
                 len(ec.buckets))
        background = ec.compile_in_background and jax.process_count() == 1
        self.compile_seconds = self.runner.compile(background)
        """Seconds the start-up compilation took (with ``compile_in_background``: its foreground part)."""
        self._idle_train_pending = self.runner.compiling and ec.finetune_idle_train_step
        if self._idle_train_pending:  # idle train steps once compiled
            self.scheduler.config = dataclasses.replace(self.scheduler.config, idle_train_step=False)
        log.info("engine ready: compiled in %.1f s (attention: %s)", self.compile_seconds, ec.attention_impl)
        self.inputs = InputProcessor(self.tokenizer, config.vocab_size, ec.max_logprobs, self._adapter_index, self.eos_token_ids, seed)
        """Prompts into requests (:class:`~coserve_jax.engine.input_processor.InputProcessor`)."""
        self.finetuning = FinetuneService(ec, config, self.runner, self.scheduler, self.tokenizer, self.model_path)
        """The finetuning jobs' lifecycle (:class:`~coserve_jax.engine.finetune_service.FinetuneService`)."""
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler)
        """The unfinished requests' outputs (:class:`~coserve_jax.engine.output_processor.OutputProcessor`)."""
        self.adapter_cache = AdapterCache(self.runner, self._adapter_pinned, self._publish, ec.max_cpu_loras) if self.adapters else None
        """Adapters over the slots with a host tier (:class:`~coserve_jax.engine.adapter_cache.AdapterCache`)."""
        self.finetuning.adapter_cache = self.adapter_cache
        self._awaiting_slot: list[Request] = []  # requests whose adapter waits for a device slot, oldest first
        self._in_flight = None  # (plan, StepOutput) of an overlapped step whose tokens are not read yet
        self._channel: HostChannel | None = None  # multi-host, process 0 after lead(); others in follow()
        self.policy = PolicyRuntime(ec, self.scheduler, self.runner, self._publish)
        """The step policy, its latency model and the step log (:class:`~coserve_jax.engine.policy_runtime.PolicyRuntime`)."""
        self.policy.set(scheduling_policy, **(policy_options or {}))
        if measure_steps:
            self.policy.ensure_latency_model()
        self.num_steps = 0

    # ---- background compilation -----------------------------------------------------------
    @property
    def _warming_up(self) -> bool:
        return self._idle_train_pending or self.runner.compiling

    def _check_compiled(self) -> None:
        """Turn the idle train step on once its executables are compiled."""
        if self._idle_train_pending and self.runner.idle_train_ready:
            self.scheduler.config = dataclasses.replace(self.scheduler.config, idle_train_step=True)
            self._idle_train_pending = False

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the shapes that ``compile_in_background`` left to a background thread (at
        once without it). Returns whether every executable is compiled (``False``: the timeout
        passed, or the compilation failed and the engine serves with what it has; the error is
        logged)."""
        done = self.runner.wait_compiled(timeout)
        self._check_compiled()
        return done

    # ---- the resolved configuration and the policy's state, as attributes --------------------
    max_model_len = _attr("engine_config", "max_model_len", "Context length in tokens.")
    page_size = _attr("engine_config", "page_size", "Tokens per KV page.")
    max_pages_per_seq = _attr("engine_config", "max_pages_per_seq", "Page-table width.")
    max_logprobs = _attr("engine_config", "max_logprobs", "Most top logprobs a request may ask for.")
    max_finetune_tokens = _attr("engine_config", "max_finetune_tokens", "Most finetuning forward tokens in one step (0 without finetuning).")
    attention_impl = _attr("engine_config", "attention_impl", "The attention implementation in use.")
    finetune_layout = _attr("engine_config", "finetune", "The finetuning buffers' layout (``None``: no finetuning).")
    tensor_parallel_size = _attr("engine_config", "tensor_parallel_size", "Devices the model is split over.")
    kv_cache_bytes = _attr("engine_config", "kv_cache_bytes", "Bytes of K and V cache on each device.")
    slo = _attr("engine_config", "slo", "The default SLOs (:class:`~coserve_jax.sched.policy.SLOConfig`).")
    scheduling_policy = _attr("policy", "name", "The step policy in use.")
    latency_model = _attr("policy", "latency_model", "The fitted step latency model (``None`` until needed).")
    latency_model_cached = _attr("policy", "latency_model_cached", "The latency model came from the cached profile.")
    last_step_ms = _attr("policy", "last_step_ms", "The last measured step's device time (ms).")
    step_log = _attr("policy", "step_log", "One :class:`StepRecord` per measured step, oldest first (the last million).")

    @property
    def buckets(self) -> list[Bucket]:
        """The compiled step shapes."""
        return list(self.engine_config.buckets)

    @property
    def adapters(self) -> AdapterManager | None:
        """The adapter pool's slot manager (``None``: no pool)."""
        return self.runner.adapters

    # ---- scheduling policy -----------------------------------------------------------------
    def set_scheduling_policy(self, name: str, **options) -> None:
        """Choose how each step is sized, between steps (the compiled shapes stay).

        Args:
            name: ``"fixed"``: the engine's ``max_num_batched_tokens`` / ``max_finetune_tokens``
                every step (no options). ``"hybrid"``: the SLO policy
                (:class:`~coserve_jax.sched.hybrid_policy.HybridPolicy`; fits the latency model
                on first use). ``"fixed_budget"``: FlexLLM's fixed budget
                (:class:`~coserve_jax.sched.baseline_policies.FixedBudgetPolicy`; options
                ``max_tokens``, ``max_finetune_tokens``, default the engine's). ``"temporal"``:
                temporal sharing (:class:`~coserve_jax.sched.baseline_policies.TemporalPolicy`;
                options ``interval_steps`` (default 64), ``sequences_per_iteration`` (default 1)).
            **options: the policy's options, as above.
        Raises:
            ValueError: an unknown policy or option, or a bad option value.
        """
        self.policy.set(name, **options)

    def set_slo(self, slo: SLOConfig | dict) -> None:
        """Replace the default SLOs between steps (requests that carry their own keep them);
        the step policy in use is rebuilt with them.

        Args:
            slo: an :class:`~coserve_jax.sched.policy.SLOConfig` or a dict of its fields.
        Raises:
            ValueError, TypeError: bad fields (as ``SLOConfig``).
        """
        slo = slo if isinstance(slo, SLOConfig) else SLOConfig(**slo)
        self.engine_config = dataclasses.replace(self.engine_config, slo=slo)
        self.policy.config = self.engine_config
        self.policy.set(self.policy.name, **self.policy.options)

    # ---- adapters ------------------------------------------------------------------------
    def load_adapter(self, name: str, peft_dir: str | os.PathLike | LoRAWeights) -> None:
        """Load a PEFT LoRA adapter directory (or in-memory :class:`LoRAWeights`) under ``name``,
        usable by requests at once. With every slot taken, the least recently used adapter
        that nothing uses is parked on the host (:mod:`coserve_jax.engine.adapter_cache`).

        Raises:
            AdapterError: no LoRA pool, a name in use, every slot in use by requests or jobs, or
                an adapter that does not fit the pool (rank, target modules, shapes); the pool
                is unchanged.
            AdapterFormatError: a malformed adapter directory.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0)")
        self.adapter_cache.load(name, peft_dir)  # the other processes get the weights, not a path

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's slot.

        Raises:
            AdapterError: unknown name, or unfinished requests still use it.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0)")
        users = [r.request_id for r in self.outputs.requests if r.lora_name == name]  # in a slot or waiting for one
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {len(users)} unfinished request(s)")
        if name not in self.adapter_cache.parked:  # (a parked adapter: no job trains it)
            job = self.finetuning.training_adapter(self.adapters.adapter_index(name))
            if job is not None:
                raise AdapterError(f"adapter {name!r} is being trained by finetuning job {job.id!r}; cancel it first")
        self.adapter_cache.unload(name)

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters (in a device slot or parked on the host: all servable)."""
        return [] if self.adapters is None else self.adapter_cache.names

    def _adapter_index(self, name: str) -> int:
        """A new request's adapter index (a parked adapter comes back into a slot), or
        :data:`ADAPTER_PENDING` when every slot is pinned now: the request then waits, and
        :meth:`_place_adapters` gives it a slot when one frees up.

        Raises:
            AdapterError: no pool, or an unknown name.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0); requests cannot name an adapter")
        index = self.adapter_cache.try_index(name)
        return ADAPTER_PENDING if index is None else index

    def _place_adapters(self) -> list[RequestOutput]:
        """Give the adapters of requests waiting for a device slot their slots, oldest request
        first, as slots free up (a request, job or evaluation that pinned one ended). Returns
        the final outputs of requests whose adapter could not be read back (aborted, logged)."""
        waiting, failed = [], []
        for req in self._awaiting_slot:
            if req.is_finished:
                continue
            try:
                index = self.adapter_cache.try_index(req.lora_name)
            except Exception as e:  # e.g. its directory vanished after its host copy was dropped
                log.error("request %s: adapter %r cannot be loaded (%s: %s); aborted", req.request_id, req.lora_name,
                          type(e).__name__, e)
                failed.append(self.abort(req.request_id))
                continue
            if index is None:
                waiting.append(req)
            else:
                req.adapter_index = index
        self._awaiting_slot = waiting
        return [o for o in failed if o is not None]

    def _adapter_pinned(self, index: int) -> bool:
        """Whether slot ``index`` must stay: an unfinished request, a job or an evaluation uses it."""
        return (any(r.adapter_index == index for r in self.outputs.requests)
                or self.finetuning.training_adapter(index) is not None
                or any(ev.adapter_index == index for ev in self.finetuning.evaluations.values()))

    # ---- finetuning ----------------------------------------------------------------------
    def create_finetuning_job(
        self,
        training_data: str | os.PathLike | Sequence[TrainingExample],
        config: FinetuneConfig | None = None,
        *,
        adapter_name: str | None = None,
        job_id: str | None = None,
        eval_dataset: str | os.PathLike | Sequence[TrainingExample] | None = None,
        **settings,
    ) -> FinetuneJob:
        """Start a LoRA finetuning job that trains inside the serving steps.

        Args:
            training_data: a ``.jsonl`` / ``.json`` file of text, Alpaca, prompt-completion or
                chat records (:func:`coserve_jax.finetune.data.load_dataset`, validated up
                front), or already tokenized :class:`TrainingExample` s.
            config: the job's :class:`FinetuneConfig` (default: its defaults).
            adapter_name: the name inference requests use for the adapter being trained
                (default: the job id). It serves the latest optimizer step's weights.
            job_id: an id of your own (default ``ftjob-<12 hex>``).
            eval_dataset: held-out examples (a file or :class:`TrainingExample` s, read as the
                training data): the job's validation loss (``job.eval_history``) every
                ``eval_steps`` optimizer steps and at the end, from forward-only sequences in the
                serving steps.
            **settings: overrides of ``config`` fields (``lora`` may be a dict).
        Returns:
            The job's handle; it trains as the engine steps (:meth:`step`, :meth:`generate`,
            :meth:`wait_for`).
        Raises:
            FinetuneError: finetuning is off, all job slots are busy, a duplicate id, or a
                checkpoint that cannot be resumed.
            DataValidationError: bad records, with their line numbers; nothing is started.
            AdapterError: the adapter does not fit the pool (rank, modules) or the name is taken.
            ValueError: bad settings.
        """
        return self.finetuning.create_job(
            training_data, config, adapter_name=adapter_name, job_id=job_id, eval_dataset=eval_dataset, **settings
        )

    def create_training_run(
        self, *, rank: int = 32, seed: int | None = None, train_attn: bool = True, train_mlp: bool = True,
        train_unembed: bool = False, lora_alpha: float = 32.0, adapter_name: str | None = None,
        run_id: str | None = None,
    ) -> TrainingRun:
        """Start a Tinker training run (``ServiceClient.create_lora_training_client``): a LoRA
        adapter trained by its calls (:meth:`TrainingRun.forward_backward`,
        :meth:`TrainingRun.optim_step`, :meth:`TrainingRun.forward`) inside the serving steps.

        Args:
            rank: the LoRA rank (at most ``max_lora_rank``).
            seed: seeds the initial A (PEFT's Kaiming-uniform; B = 0); default: random.
            train_attn: adapt q/k/v/o_proj; train_mlp: adapt gate/up/down_proj (those the
                engine's pool holds; both must be in it).
            train_unembed: adapt the LM head (not supported yet: must be ``False``).
            lora_alpha: alpha (scaling ``alpha / rank``).
            adapter_name: the name inference requests use for it (default: the run id); it
                serves the latest optimizer step's weights.
            run_id: an id of your own (default ``run-<12 hex>``).
        Raises:
            FinetuneError: finetuning is off, all ``max_finetune_jobs`` slots are busy, a
                duplicate id, ``train_unembed``, or neither attention nor MLP is trained.
            AdapterError: the rank or modules do not fit the pool, or the name is taken.
        """
        if train_unembed:
            raise FinetuneError("LoRA on the LM head (train_unembed=True) is not supported yet: pass train_unembed=False")
        modules = (("q_proj", "k_proj", "v_proj", "o_proj") if train_attn else ()) + (
            ("gate_proj", "up_proj", "down_proj") if train_mlp else ())
        if not modules:
            raise FinetuneError("a training run needs train_attn or train_mlp")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        return self.finetuning.create_run(rank=rank, seed=seed, target_modules=modules, lora_alpha=lora_alpha,
                                          adapter_name=adapter_name, run_id=run_id)

    @property
    def training_runs(self) -> list[TrainingRun]:
        """Every training run of this engine, oldest first."""
        return list(self.finetuning.runs.values())

    def adapter_weights(self, job: FinetuneJob) -> LoRAWeights:
        """A job's current adapter weights on the host (:meth:`FinetuneJob.lora_weights`)."""
        return self.finetuning.adapter_weights(job)

    def export_adapter(self, job: FinetuneJob, path: str | os.PathLike) -> None:
        """Write a job's adapter as a PEFT directory (:meth:`FinetuneJob.export`). A finished
        job's export then backs its loaded adapter, whose host copy ``max_cpu_loras`` may drop."""
        self.finetuning.export_adapter(job, path)
        if job.done and self.adapter_cache is not None and job.adapter_name in self.adapter_cache.names:
            self.adapter_cache.set_source(job.adapter_name, path)

    def save_job_checkpoint(self, job: FinetuneJob) -> None:
        """Checkpoint a job now (:meth:`FinetuneJob.save_checkpoint`)."""
        self.finetuning.save_checkpoint(job)

    @property
    def finetuning_jobs(self) -> list[FinetuneJob]:
        """Every job this engine ran or runs, oldest first."""
        return list(self.finetuning.jobs.values())

    def get_finetuning_job(self, job_id: str) -> FinetuneJob:
        """Raises ``KeyError`` for an unknown id."""
        return self.finetuning.jobs[job_id]

    @property
    def has_active_jobs(self) -> bool:
        return self.finetuning.has_active_jobs

    @property
    def num_free_finetune_slots(self) -> int:
        """Jobs that :meth:`create_finetuning_job` can start now: free job rows (of
        ``max_finetune_jobs``), at most the adapter slots that are free or could be freed (a
        slot pinned by an unfinished request, a job or an evaluation cannot)."""
        rows = self.finetuning.num_free_slots
        return rows if self.adapter_cache is None else min(rows, self.adapter_cache.num_free_slots)

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        *,
        request_id: str | None = None,
        index: int = 0,
        ttft_slo_ms: float | None = None,
        tpot_slo_ms: float | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Queue one request. Returns its id.

        Args:
            prompt: text (tokenized with the engine's tokenizer, special tokens added as the
                tokenizer does by default) or token ids.
            params: sampling settings (default ``SamplingParams()``).
            adapter: name of a loaded adapter, or ``None`` for the base model.
            request_id: an id of your own (default: a fresh one).
            index: copied into the outputs (position in a batch call).
            ttft_slo_ms, tpot_slo_ms: this request's SLOs (default: the engine's ``slo``), used
                by the ``"hybrid"`` policy.
            arrival_time: when the request arrived, on the ``time.monotonic()`` clock (default:
                now); TTFT and the TTFT deadline count from it (a server or a trace replay that
                queues requests before handing them over passes the true arrival).
            priority: vLLM's request priority: lower is served first; a waiting request that
                outranks running ones preempts them for their seats and pages (default 0).
        Raises:
            ValueError: empty or over-long prompt, token ids outside the vocabulary, text without
                a tokenizer, ``logprobs`` above ``max_logprobs``, a duplicate id.
            AdapterError: unknown adapter. (A known adapter whose slot cannot be had now, every
                slot being pinned by unfinished requests, jobs or evaluations, is no error: the
                request waits until a slot frees up.)
        """
        params = params or SamplingParams()
        if params.n > 1:
            return self._add_parallel(prompt, params, adapter, request_id, index, ttft_slo_ms, tpot_slo_ms, arrival_time,
                                      priority)
        req, text = self.inputs.process(
            prompt, params, adapter, request_id=request_id, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
            arrival_time=arrival_time, priority=priority,
        )
        self.scheduler.add_request(req)  # validates length and id
        self.outputs.add(req, text, index, adapter)
        if req.adapter_index == ADAPTER_PENDING:
            self._awaiting_slot.append(req)
        return req.request_id

    def _add_parallel(self, prompt, params, adapter, request_id, index, ttft_slo_ms, tpot_slo_ms, arrival_time,
                      priority) -> str:
        """Fork a request with ``params.n > 1`` into ``n`` child requests ``"{i}_{request_id}"``
        (vLLM's names), child ``i`` seeded ``seed + i`` when a seed is given; all or none are
        queued. The children share the prompt's full pages through the prefix cache (the first
        one's pages are named when its prefill is planned; the others, admitted in the same
        step or later, match them)."""
        parent_id = request_id if request_id is not None else self.inputs.new_id()
        if parent_id in self.outputs.children or parent_id in self.scheduler.requests:
            raise ValueError(f"request id {parent_id!r} is in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children, text = [], None
        try:
            for i in range(params.n):
                seed = None if params.seed is None else (params.seed + i) % 2**32
                child_params = dataclasses.replace(params, n=1, seed=seed)
                req, t = self.inputs.process(
                    prompt if i == 0 else children[0].prompt_token_ids, child_params, adapter, request_id=f"{i}_{parent_id}",
                    ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, arrival_time=arrival, priority=priority)
                text = t if i == 0 else text
                self.scheduler.add_request(req)
                children.append(req)
        except Exception:
            for req in children:
                self.scheduler.abort(req.request_id)
            raise
        self.outputs.add_parent(parent_id, children, text, index, adapter)
        self._awaiting_slot.extend(r for r in children if r.adapter_index == ADAPTER_PENDING)
        return parent_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request (a parallel-sampling one: every unfinished completion) and free its
        pages. Returns its final output (``finish_reason="abort"``), ``None`` for an unknown or
        ended request."""
        children = self.outputs.children.get(request_id)
        if children is not None:  # a parallel-sampling request: all its completions
            now = time.monotonic()
            ended = [self.outputs.finalize(r, now) for r in map(self.scheduler.abort, children) if r is not None]
            folded = self.outputs.fold(ended)
            return folded[0] if folded else None
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self.outputs.finalize(req, time.monotonic())

    def reset_prefix_cache(self) -> int:
        """Forget every cached KV page (vLLM's ``LLM.reset_prefix_cache``): later requests match
        nothing computed before. Running requests keep their pages. Returns the pages forgotten."""
        return self.scheduler.kv_cache.reset_prefix_cache()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens computed in prefill chunks since start (recomputation included; tokens found in
        the prefix cache are not computed, so not counted)."""
        return self.scheduler.num_prefill_tokens

    # ---- the loop ------------------------------------------------------------------------
    def step(self, plan: SchedulerOutput | None = None) -> list[RequestOutput]:
        """Run one step. Returns an output for every request that got a token or finished
        (with this step's ``delta_token_ids`` / ``delta_text``). The outputs of unfinished
        requests are live objects that later steps update; copy what you keep.

        Finetuning work planned into the step (a forward chunk, a backward slice) runs too, and
        jobs whose accumulation group completed take their optimizer step.

        With ``async_scheduling`` the step is dispatched before the previous one's tokens are
        read, and the outputs returned are the previous step's: the host plans and builds step
        N+1 while the device runs step N (a request's last token may cost one decode that is
        thrown away; the tokens are the same).

        Args:
            plan: a plan made by process 0's engine (multi-host followers, :meth:`follow`);
                default: this engine's scheduler plans the step.
        """
        if self._warming_up:
            self._check_compiled()
        # 1. Schedule: the plan, as plain data (a token the device has not returned yet is
        #    pending). Multi-host: process 0 plans and publishes; the others run its plan.
        failed = self._place_adapters() if self._awaiting_slot and plan is None else []
        if plan is None:
            plan = self.scheduler.schedule(time.monotonic())
            if self._channel is not None and not (plan.is_empty and not plan.finished and not plan.preempted):
                self._publish("step", plan)
        else:
            self.scheduler.follow(plan)
        # 2. Execute: dispatch the fused step and the backward slice; nothing waits.
        t_dispatch = time.perf_counter()
        out = self.runner.execute(plan)  # None for a plan without tokens
        if not plan.is_empty:
            if out is not None:
                self.finetuning.record_forward(plan, out.ft_loss, out.ft_logprobs)
            if plan.backward is not None:
                self.runner.run_backward(plan.backward)
            if plan.train is not None:
                self.finetuning.record_train(plan.train, *self.runner.run_train(plan.train))
            self.num_steps += 1
            if self.policy.measures and not self._warming_up:  # (padded shapes, a compiling thread)
                self.policy.measure(plan, out, t_dispatch)
        # 3. Train: training progress needs no device result; optimizer steps are dispatched
        #    after this step and before the next.
        self.scheduler.update_training(plan)
        self.finetuning.advance()
        # 4. Update: the tokens of this step, or (overlapped) of the previous one.
        ready = (plan, out) if plan.num_inference_seqs else None
        if self.engine_config.async_scheduling:
            ready, self._in_flight = self._in_flight, ready
        if ready is None:
            return failed
        plan, out = ready
        result = self.runner.fetch(plan, out)
        now = time.monotonic()
        self.scheduler.update(plan, result, now)
        # 5. Process outputs: detokenize, stop strings, logprobs, finished requests.
        outputs = self.outputs.process(plan, result, now)
        return failed + outputs if failed else outputs

    @property
    def has_step_in_flight(self) -> bool:
        """An overlapped step's results are not read yet (the next :meth:`step` reads them)."""
        return self._in_flight is not None

    # ---- multi-host ------------------------------------------------------------------------
    def lead(self) -> None:
        """Process 0 of a multi-host engine: from now on publish every plan and every call that
        changes device state (adapters, jobs) to the other processes, which run them in
        :meth:`follow`. Requests go to process 0 only.

        Raises:
            RuntimeError: not process 0 of a multi-process job.
        """
        if jax.process_count() < 2 or jax.process_index() != 0:
            raise RuntimeError("lead() is for process 0 of a multi-process engine")
        self._channel = HostChannel()
        self.finetuning.publish = self._publish

    def stop_followers(self) -> None:
        """Tell the following processes to return from :meth:`follow` (process 0, at shutdown)."""
        self._publish("stop")

    def _publish(self, kind: str, *args) -> None:
        if self._channel is not None:
            self._channel.publish((kind, args))

    def follow(self, timeout_s: float | None = None) -> int:
        """Processes other than 0 of a multi-host engine: run what process 0's engine publishes
        (after its :meth:`lead`) until it stops. This engine, built with the same arguments,
        takes no requests of its own; its device work is process 0's, step for step, so the
        steps' collectives join the processes. Returns the number of steps run.

        Args:
            timeout_s: give up when nothing arrives for this long (``None``: wait for ever).
        Raises:
            RuntimeError: called on process 0, or on a single-process engine.
            TimeoutError: ``timeout_s`` passed with nothing published.
        """
        from coserve_jax.engine.multihost import follow

        return follow(self, timeout_s)
