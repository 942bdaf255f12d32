"""The notebook-facing inference engine (vLLM's ``LLM`` / ``LLMEngine`` in one class).

``Engine`` owns the model, the paged KV cache on the device, the compiled step of every bucket,
the host-side scheduler and the adapters. One :meth:`Engine.step` = schedule (host) -> build the
padded inputs (host) -> run the compiled step (device) -> append sampled tokens, detokenize,
check stop conditions (host). :meth:`Engine.generate` and :meth:`Engine.stream` loop over steps.

Finetuning jobs (:meth:`Engine.create_finetuning_job`) ride in the same steps: a forward chunk of
a training sequence in the token slots inference leaves free, and a backward slice dispatched
right after (:mod:`coserve_jax.finetune.fused`); the optimizer step runs when a job's
accumulation group is complete and writes the job's adapter slot.

Not thread-safe: one thread drives an engine (the server runs it in its own loop thread).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import pathlib
import time
import uuid
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coserve_jax.engine.detokenizer import IncrementalDetokenizer
from coserve_jax.engine.outputs import RequestOutput, StepRecord
from coserve_jax.engine.config import EngineConfig
from coserve_jax.engine.model_runner import ModelRunner
from coserve_jax.engine.step import Bucket, configure_compilation_cache
from coserve_jax.engine.profile import fitted_latency_model
from coserve_jax.finetune import fused
from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.finetune.data import TrainingExample, TrainingSet, load_dataset, truncate_examples
from coserve_jax.finetune.evaluation import Evaluation
from coserve_jax.finetune.job import FinetuneError, FinetuneJob, JobStatus, plan_steps
from coserve_jax.finetune.optim import init_lora, learning_rate_schedule, make_optimizer, make_update_fn
from coserve_jax.lora.manager import AdapterError, AdapterManager
from coserve_jax.lora.peft_io import LoRAWeights
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.models.decoder import CausalLM
from coserve_jax.models.loader import is_gguf, load_config, load_model
from coserve_jax.parallel.distributed import DistributedConfig, initialize_distributed
from coserve_jax.parallel.mesh import make_mesh
from coserve_jax.parallel.rules import ShardingRules
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams, as_params_list
from coserve_jax.sched.policy import POLICY_OPTIONS, SLOConfig, make_policy, step_shape
from coserve_jax.sched.scheduler import Scheduler

Prompt = str | Sequence[int]

DEFAULT_CACHE_DIR = os.environ.get("COSERVE_JAX_CACHE_DIR", os.path.join(pathlib.Path.home(), ".cache", "coserve_jax", "xla"))


def _eos_ids(path: str | os.PathLike | None, config: ModelConfig, tokenizer) -> frozenset[int]:
    ids = set(config.eos_token_ids)
    if path is not None:
        gen = pathlib.Path(path) / "generation_config.json"  # (none beside a .gguf file: its metadata has the EOS)
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                ids = set(eos if isinstance(eos, list) else [eos])  # generation_config wins, as in HF
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class Engine:
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
        max_model_len: context length in tokens (default: the checkpoint's).
        max_num_seqs: most sequences running at once (and in one step).
        max_num_batched_tokens: token budget of one step (prefill chunks + decode tokens).
        page_size: tokens per KV page.
        num_kv_pages: pages in the KV cache (page 0 is scratch). Default: the fraction
            ``kv_cache_memory_fraction`` of the device memory left after the weights, on devices
            that report memory (GPU); elsewhere enough for ``max_num_seqs`` full-length sequences,
            at most 1 GiB.
        kv_cache_memory_fraction: see ``num_kv_pages``.
        max_loras: adapter slots (0: no LoRA pool).
        max_lora_rank: rank every slot is padded to.
        lora_target_modules: modules the pool covers (default: all seven linear layers).
        max_logprobs: most top logprobs a request may ask for.
        token_buckets, seq_buckets: step shapes to compile (default: powers of two; see
            :func:`coserve_jax.engine.step.make_buckets`).
        attention_impl: ``"auto"`` (Pallas on GPU, the pure-JAX reference elsewhere), or one of
            :data:`coserve_jax.kernels.paged_attention.IMPLEMENTATIONS`.
        compilation_cache_dir: persistent XLA compilation cache (``None``: off). Default
            ``$COSERVE_JAX_CACHE_DIR`` or ``~/.cache/coserve_jax/xla``.
        seed: seeds the per-request seeds of requests that give none.
        watermark_pages: free pages admission keeps for running requests to grow into
            (default: 1% of the cache, at least 1).
        max_finetune_jobs: finetuning jobs that can train at once (0: no finetuning; needs a
            LoRA pool). Each takes an activation-store row of ``num_layers x
            finetune_max_seq_len x hidden`` values.
        finetune_max_seq_len: longest training sequence in tokens (default
            ``min(max_model_len, 2048)``).
        max_finetune_tokens: most finetuning forward tokens in one step (default: all of
            ``max_num_batched_tokens`` that inference leaves).
        finetune_layers_per_slice: decoder layers of backward work per step (divides the number
            of layers).
        finetune_seq_buckets: sequence lengths the backward slice is compiled for (default:
            powers of two from 64 up to ``finetune_max_seq_len``).
        scheduling_policy: ``"fixed"`` (the step budgets above, every step), ``"hybrid"``
            (each step sized from the latency model and the requests' SLOs,
            :mod:`coserve_jax.sched.hybrid_policy`; the model is fitted from a start-up profile,
            cached beside the compilation cache, and refined from every measured step), or a
            baseline of :mod:`coserve_jax.sched.baseline_policies`: ``"fixed_budget"``,
            ``"temporal"`` (see :meth:`set_scheduling_policy`).
        policy_options: keyword arguments of that policy (:meth:`set_scheduling_policy`).
        slo: default SLOs and policy knobs (:class:`SLOConfig` or a dict of its fields) for
            ``"hybrid"``.
        measure_steps: time every step on the device (one sync per step) and log it with the
            latency model's prediction in :attr:`step_log` (always on under ``"hybrid"``).
        tensor_parallel_size: devices the model is split over, Megatron-style, with LoRA
            adapters and finetuning state split by the same rule (:mod:`coserve_jax.parallel.rules`;
            ``docs/parallelism.md``). The first ``tensor_parallel_size`` of ``jax.devices()``
            (all processes') are used.
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
        scheduling_policy: str = "fixed",
        policy_options: dict | None = None,
        slo: SLOConfig | dict | None = None,
        measure_steps: bool = False,
        tensor_parallel_size: int = 1,
        distributed: DistributedConfig | dict | None = None,
    ):
        initialize_distributed(distributed)
        configure_compilation_cache(compilation_cache_dir)
        path = None
        self.mesh = make_mesh(tensor_parallel_size)
        if isinstance(model, CausalLM):
            self.model = model
            self.rules = ShardingRules(model.config, self.mesh)
            state = nnx.state(model)
            nnx.update(model, jax.device_put(state, self.rules.state_shardings(state)))
        else:
            path = model
            lora = LoRAPoolConfig(max_loras, max_lora_rank, tuple(lora_target_modules)) if max_loras > 0 else None
            self.rules = ShardingRules(load_config(model, max_model_len=max_model_len), self.mesh)
            self.model = load_model(model, dtype=dtype, lora=lora, max_model_len=max_model_len, sharding=self.rules.sharding)
        config = self.model.config
        self.config = config
        """The model's :class:`~coserve_jax.models.config.ModelConfig`."""
        pool = self.model.lora.config if self.model.lora is not None else None
        self.engine_config = EngineConfig.resolve(
            config, has_lora_pool=pool is not None, kv_cache_heads=self.rules.kv_cache_heads,
            dtype_itemsize=jnp.dtype(self.model.dtype).itemsize, device_memory=self.mesh.local_devices[0].memory_stats(),
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            page_size=page_size, num_kv_pages=num_kv_pages, kv_cache_memory_fraction=kv_cache_memory_fraction,
            max_loras=pool.max_loras if pool else 0, max_lora_rank=pool.max_lora_rank if pool else max_lora_rank,
            lora_target_modules=pool.target_modules if pool else tuple(lora_target_modules), max_logprobs=max_logprobs,
            token_buckets=token_buckets, seq_buckets=seq_buckets, attention_impl=attention_impl,
            compilation_cache_dir=compilation_cache_dir, seed=seed, watermark_pages=watermark_pages,
            max_finetune_jobs=max_finetune_jobs, finetune_max_seq_len=finetune_max_seq_len,
            max_finetune_tokens=max_finetune_tokens, finetune_layers_per_slice=finetune_layers_per_slice,
            finetune_seq_buckets=finetune_seq_buckets, scheduling_policy=scheduling_policy, policy_options=policy_options,
            slo=slo, measure_steps=measure_steps, tensor_parallel_size=tensor_parallel_size,
        )
        """Every resolved limit, bucket grid and layout (:class:`~coserve_jax.engine.config.EngineConfig`)."""
        ec = self.engine_config
        self.tokenizer = self._tokenizer(tokenizer, path)
        self.eos_token_ids = _eos_ids(path, config, self.tokenizer)
        self.model_path = None if path is None else os.fspath(path)
        self.scheduler = Scheduler(ec.scheduler_config(), KVCacheManager(ec.num_kv_pages, ec.page_size))
        self.runner = ModelRunner(self.model, self.rules, ec)
        """The device owner (:class:`~coserve_jax.engine.model_runner.ModelRunner`)."""
        self.compile_seconds = self.runner.compile()
        self._jobs: dict[str, FinetuneJob] = {}
        self._evaluations: dict[str, Evaluation] = {}  # engine.evaluate's passes in flight
        self._free_rows = list(range(ec.finetune.max_jobs)) if ec.finetune is not None else []
        self.slo = ec.slo
        self.latency_model = None
        self.latency_model_cached = False
        self.measure_steps = measure_steps
        self.last_step_ms: float | None = None
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=1_000_000)
        """One :class:`StepRecord` per measured step, oldest first (the last million)."""
        self.scheduling_policy = "fixed"
        self.set_scheduling_policy(scheduling_policy, **(policy_options or {}))
        if measure_steps:
            self._ensure_latency_model()
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._outputs: dict[str, RequestOutput] = {}
        self._detok: dict[str, IncrementalDetokenizer | None] = {}
        self._requests: dict[str, Request] = {}
        self.num_steps = 0

    # ---- the resolved configuration, as attributes -----------------------------------------
    @property
    def max_model_len(self) -> int:
        """Context length in tokens."""
        return self.engine_config.max_model_len

    @property
    def page_size(self) -> int:
        """Tokens per KV page."""
        return self.engine_config.page_size

    @property
    def max_pages_per_seq(self) -> int:
        """Page-table width."""
        return self.engine_config.max_pages_per_seq

    @property
    def max_logprobs(self) -> int:
        """Most top logprobs a request may ask for."""
        return self.engine_config.max_logprobs

    @property
    def max_finetune_tokens(self) -> int:
        """Most finetuning forward tokens in one step (0 without finetuning)."""
        return self.engine_config.max_finetune_tokens

    @property
    def buckets(self) -> list[Bucket]:
        """The compiled step shapes."""
        return list(self.engine_config.buckets)

    @property
    def attention_impl(self) -> str:
        """The attention implementation in use."""
        return self.engine_config.attention_impl

    @property
    def finetune_layout(self) -> fused.FinetuneLayout | None:
        """The finetuning buffers' layout (``None``: no finetuning)."""
        return self.engine_config.finetune

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine_config.tensor_parallel_size

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of K and V cache on each device."""
        return self.engine_config.kv_cache_bytes

    @property
    def adapters(self) -> AdapterManager | None:
        """The adapter pool's slot manager (``None``: no pool)."""
        return self.runner.adapters

    # ---- scheduling policy -----------------------------------------------------------------
    def _ensure_latency_model(self) -> None:
        if self.latency_model is None:
            self.latency_model, self.latency_model_cached = fitted_latency_model(self.runner, self.engine_config.compilation_cache_dir)

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
        cfg = self.scheduler.config
        if name not in POLICY_OPTIONS:
            raise ValueError(f"scheduling_policy must be one of {sorted(POLICY_OPTIONS)}, got {name!r}")
        if name == "hybrid" and not options:
            self._ensure_latency_model()
        policy = make_policy(
            name, options, max_num_batched_tokens=cfg.max_num_batched_tokens, max_finetune_tokens=cfg.max_finetune_tokens,
            latency_model=self.latency_model, slo=self.slo, token_buckets=self.engine_config.token_buckets,
            seq_buckets=self.engine_config.seq_buckets, backward_buckets=self.engine_config.backward_buckets,
        )
        self.scheduler.policy = policy
        self.scheduling_policy = name

    # ---- construction helpers ------------------------------------------------------------
    @staticmethod
    def _tokenizer(tokenizer, path):
        if tokenizer is None and path is not None and is_gguf(path):
            from coserve_jax.models.gguf import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if tokenizer is None and path is not None:
            p = pathlib.Path(path)
            if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                tokenizer = p
        if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        from coserve_jax.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)

    # ---- adapters ------------------------------------------------------------------------
    def load_adapter(self, name: str, peft_dir: str | os.PathLike | LoRAWeights) -> None:
        """Load a PEFT LoRA adapter directory (or in-memory :class:`LoRAWeights`) under ``name``,
        usable by requests at once.

        Raises:
            AdapterError: no LoRA pool, a name in use, no free slot, or an adapter that does not fit
                the pool (rank, target modules, shapes); the pool is unchanged.
            AdapterFormatError: a malformed adapter directory.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0)")
        self.runner.load_adapter(name, peft_dir)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's slot.

        Raises:
            AdapterError: unknown name, or unfinished requests still use it.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0)")
        index = self.adapters.adapter_index(name)
        for job in self._jobs.values():
            if job.adapter_index == index and not job.done:
                raise AdapterError(f"adapter {name!r} is being trained by finetuning job {job.id!r}; cancel it first")
        users = [r.request_id for r in self._requests.values() if r.adapter_index == index]
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {len(users)} unfinished request(s)")
        self.runner.unload_adapter(name)

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return [] if self.adapters is None else self.adapters.names

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
        if self.finetune_layout is None:
            raise FinetuneError(
                "this engine has no finetuning (max_finetune_jobs=0 or no LoRA pool: max_loras=0)"
            )
        cfg = config or FinetuneConfig()
        if settings:
            cfg = FinetuneConfig.from_dict({**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **settings})
        lora = cfg.lora
        pool = self.model.lora.config
        if lora.r > pool.max_lora_rank:
            raise AdapterError(f"LoRA rank r={lora.r} exceeds the engine's max_lora_rank={pool.max_lora_rank}")
        missing = [m for m in lora.target_modules if m not in pool.target_modules]
        if missing:
            raise AdapterError(f"target_modules {missing} are not in the engine's LoRA pool {list(pool.target_modules)}")
        job_id = job_id or f"ftjob-{uuid.uuid4().hex[:12]}"
        if job_id in self._jobs:
            raise FinetuneError(f"a finetuning job with id {job_id!r} exists")
        name = adapter_name or job_id
        if name in self.list_adapters():
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        layout = self.finetune_layout
        examples = self._examples(training_data, cfg)
        eval_examples = self._examples(eval_dataset, cfg) if eval_dataset is not None else None
        if not self._free_rows:
            raise FinetuneError(f"all {layout.max_jobs} finetuning job slots are busy (max_finetune_jobs)")
        _, total_steps = plan_steps(cfg, len(examples))
        tx = make_optimizer(cfg, total_steps)
        schedule = learning_rate_schedule(cfg, total_steps)
        L = self.config.num_layers
        shapes = {}
        for m in pool.target_modules:
            d_in, d_out = self.config.module_dims(m)
            shapes[m] = ((L, d_in, pool.max_lora_rank), (L, pool.max_lora_rank, d_out))
        update = jax.jit(make_update_fn(tx, schedule, lora.r, pool.max_lora_rank, self.model.dtype, shapes), donate_argnums=(2,))
        checkpointer = JobCheckpointer(cfg.checkpoint_dir, cfg.save_total_limit) if cfg.checkpoint_dir else None
        row = self._free_rows[0]
        job = FinetuneJob(
            job_id=job_id, adapter_name=name, examples=examples, config=cfg, store_row=row, adapter_index=0,
            num_layers=self.config.num_layers, layers_per_slice=layout.layers_per_slice,
            params=self.runner.place_job_params(init_lora(self.config, lora, cfg.seed)), tx=tx, update_fn=update, checkpointer=checkpointer,
            base_model_name_or_path=self.model_path, cancel_fn=self._cancel_job, eval_examples=eval_examples,
            truncated_examples=examples.truncated_examples, skipped_examples=examples.skipped_examples,
        )
        if cfg.resume:
            job.restore_latest()
        job.compile_update(self.runner.ft_buffers.grads)
        self.load_adapter(name, job.lora_weights())
        job.adapter_index = self.adapters.adapter_index(name)
        self._free_rows.remove(row)
        self.runner.zero_grad_row(row)
        self._jobs[job_id] = job
        if job.complete:
            self._end_job(job, JobStatus.SUCCEEDED)
        else:
            self._feed(job)
        return job

    def _examples(self, data, cfg: FinetuneConfig) -> TrainingSet:
        """A job's training or evaluation examples, fitted to ``finetune_max_seq_len``."""
        max_len = self.finetune_layout.max_seq_len
        if isinstance(data, (str, os.PathLike)):
            if self.tokenizer is None:
                raise FinetuneError("this engine has no tokenizer: pass TrainingExample lists")
            return load_dataset(
                data, self.tokenizer, train_on_prompt=cfg.train_on_prompt, columns=cfg.columns,
                max_seq_len=max_len, chat_template=cfg.chat_template, truncation=cfg.truncation,
            )
        examples = list(data)
        if not examples:
            raise ValueError("no training examples")
        fitted = truncate_examples(examples, max_len, cfg.truncation)
        bad = [i for i, e in enumerate(fitted) if any(not 0 <= t < self.config.vocab_size for t in e.token_ids)]
        if bad:
            raise ValueError(f"examples {bad[:5]} hold token ids outside the vocabulary")
        return fitted

    def evaluate(
        self, data: str | os.PathLike | Sequence[TrainingExample], adapter: str | None = None,
        config: FinetuneConfig | None = None,
    ) -> float:
        """Validation loss of the base model or an adapter on ``data``: the mean per-token
        cross-entropy (nats) over the loss-masked target tokens, computed by forward-only
        sequences in the serving steps (this call steps the engine until they are done; other
        requests and jobs advance meanwhile, their outputs are not returned).

        Args:
            data: a file (read with ``config``'s data settings: ``columns``, ``chat_template``
                ...) or :class:`TrainingExample` s; records longer than
                ``finetune_max_seq_len`` are truncated as ``config.truncation`` says.
            adapter: an adapter name (e.g. a job's), or ``None`` for the base model.
        Raises:
            FinetuneError: no finetuning in this engine. AdapterError: unknown adapter.
            DataValidationError, ValueError: bad data.
        """
        if self.finetune_layout is None:
            raise FinetuneError("this engine has no finetuning (max_finetune_jobs=0 or max_loras=0)")
        index = self.adapters.adapter_index(adapter) if adapter else 0
        examples = self._examples(data, config or FinetuneConfig())
        ev = Evaluation(f"eval-{uuid.uuid4().hex[:12]}", examples, index, self.config.num_layers, self.finetune_layout.layers_per_slice)
        self._evaluations[ev.id] = ev
        try:
            self.scheduler.add_training_sequence(ev.next_sequence())
            while not ev.done:
                self.step()
        finally:
            self._evaluations.pop(ev.id, None)
            self.scheduler.remove_training(ev.id)
        return ev.record(time.time()).loss

    @property
    def finetuning_jobs(self) -> list[FinetuneJob]:
        """Every job this engine ran or runs, oldest first."""
        return list(self._jobs.values())

    def get_finetuning_job(self, job_id: str) -> FinetuneJob:
        """Raises ``KeyError`` for an unknown id."""
        return self._jobs[job_id]

    @property
    def has_active_jobs(self) -> bool:
        return any(not j.done for j in self._jobs.values())

    @property
    def num_free_finetune_slots(self) -> int:
        """Jobs that :meth:`create_finetuning_job` can start now (of ``max_finetune_jobs``)."""
        return len(self._free_rows)

    def wait_for(self, *jobs: FinetuneJob, max_steps: int | None = None) -> None:
        """Step the engine until ``jobs`` (default: all active) are done, or ``max_steps`` steps.
        Outputs of inference requests produced meanwhile are not returned (use :meth:`step`
        yourself to serve and train together)."""
        jobs = jobs or tuple(j for j in self._jobs.values() if not j.done)
        n = 0
        while any(not j.done for j in jobs) and (max_steps is None or n < max_steps):
            self.step()
            n += 1

    def _feed(self, job: FinetuneJob) -> None:
        seq = job.next_sequence()
        if seq is not None:
            self.scheduler.add_training_sequence(seq)

    def _advance_jobs(self) -> None:
        for seq in self.scheduler.pop_trained():
            ev = self._evaluations.get(seq.job_id)
            if ev is not None:
                if not ev.sequence_done(seq):
                    self.scheduler.add_training_sequence(ev.next_sequence())
                continue
            job = self._jobs.get(seq.job_id)
            if job is None or job.done:
                continue
            try:
                if job.sequence_done(seq):
                    self.runner.optimizer_step(job)
                if job.complete:
                    self._end_job(job, JobStatus.SUCCEEDED)
                else:
                    self._feed(job)
            except Exception as e:  # one job's failure (e.g. a full disk at checkpoint) ends it alone
                self._end_job(job, JobStatus.FAILED, f"{type(e).__name__}: {e}")

    def _end_job(self, job: FinetuneJob, status: JobStatus, error: str | None = None) -> None:
        self.scheduler.remove_training(job.id)
        job.finish(status, error)
        if job.store_row not in self._free_rows:
            self._free_rows.append(job.store_row)
            self._free_rows.sort()

    def _cancel_job(self, job: FinetuneJob) -> None:
        self._end_job(job, JobStatus.CANCELLED)

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
        Raises:
            ValueError: empty or over-long prompt, token ids outside the vocabulary, text without
                a tokenizer, ``logprobs`` above ``max_logprobs``, a duplicate id.
            AdapterError: unknown adapter.
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            text, ids = prompt, list(self.tokenizer(prompt)["input_ids"])
        else:
            text, ids = None, [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is above max_logprobs={self.max_logprobs}")
        adapter_index = 0
        if adapter:
            if self.adapters is None:
                raise AdapterError("this engine has no LoRA pool (max_loras=0)")
            adapter_index = self.adapters.adapter_index(adapter)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        req = Request(
            request_id=rid, prompt_token_ids=ids, params=params, adapter_index=adapter_index, seed=seed,
            eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
        )
        self.scheduler.add_request(req)  # validates length and id
        self._requests[rid] = req
        self._outputs[rid] = RequestOutput(
            request_id=rid, index=index, prompt=text, prompt_token_ids=ids, adapter=adapter or None,
            arrival_time=req.arrival_time,
            logprobs=[] if params.logprobs is not None else None,
            top_logprobs=[] if params.logprobs else None,
        )
        self._detok[rid] = (
            None if self.tokenizer is None
            else IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
        )
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its pages. Returns its final output (``finish_reason="abort"``)."""
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        return self._finalize(req, time.monotonic())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. Returns an output for every request that got a token or finished
        (with this step's ``delta_token_ids`` / ``delta_text``). The outputs of unfinished
        requests are live objects that later steps update; copy what you keep.

        Finetuning work planned into the step (a forward chunk, a backward slice) runs too, and
        jobs whose accumulation group completed take their optimizer step."""
        plan = self.scheduler.schedule(time.monotonic())
        if plan.is_empty:
            return []
        out = None
        t_dispatch = time.perf_counter()
        if plan.num_tokens:
            out, ft_loss = self.runner.execute(plan)
            if plan.finetune is not None:
                chunk = plan.finetune
                owner = self._jobs.get(chunk.job_id) or self._evaluations.get(chunk.job_id)
                if owner is not None:
                    owner.add_forward_loss(chunk, ft_loss)
        if plan.backward is not None:
            self.runner.run_backward(plan.backward)
        self.num_steps += 1
        if self.measure_steps or self.scheduling_policy == "hybrid":
            self._measure(plan, out, t_dispatch)
        if not plan.chunks:
            self.scheduler.update(plan, [], time.monotonic())
            self._advance_jobs()
            return []
        tokens, chosen, top_ids, top_lp = self.runner.fetch(out)
        now = time.monotonic()
        sampled = [int(tokens[i]) if c.sample else None for i, c in enumerate(plan.chunks)]
        self.scheduler.update(plan, sampled, now)
        self._advance_jobs()
        results = []
        for i, c in enumerate(plan.chunks):
            if not c.sample:
                continue
            req = self._requests.get(c.request_id)
            o = self._outputs.get(c.request_id)
            if o is None or req is None:  # aborted meanwhile
                continue
            tok = sampled[i]
            o.token_ids.append(tok)
            o.delta_token_ids = [tok]
            if o.first_token_time is None:
                o.first_token_time = now
            if o.logprobs is not None:
                o.logprobs.append(float(chosen[i]))
            if o.top_logprobs is not None:
                k = req.params.logprobs
                o.top_logprobs.append({int(t): float(v) for t, v in zip(top_ids[i, :k], top_lp[i, :k])})
            o.num_preemptions = req.num_preemptions
            det = self._detok[req.request_id]
            if det is not None:
                det.add(tok)
                if det.stopped and not req.is_finished:
                    self.scheduler.finish(req.request_id)
            if req.is_finished:
                results.append(self._finalize(req, now))
            else:
                o.delta_text = det.take_delta() if det is not None else ""
                o.text += o.delta_text
                results.append(o)
        return results

    def _measure(self, plan, out, t_dispatch: float) -> None:
        """Time the step on the device, log it, and refine the latency model with it."""
        self.runner.wait(out)
        end = time.perf_counter()
        self.last_step_ms = (end - t_dispatch) * 1000.0
        ec = self.engine_config
        shape = step_shape(plan, ec.token_buckets, ec.seq_buckets, ec.backward_buckets)
        predicted = self.latency_model.predict(shape)
        self.latency_model.update(shape, self.last_step_ms)
        decode = plan.num_decode_tokens
        self.step_log.append(StepRecord(
            end_time=time.monotonic(), bucket_tokens=shape.num_tokens, bucket_seqs=shape.num_seqs,
            prefill_tokens=sum(c.num_tokens for c in plan.chunks) - decode, decode_tokens=decode,
            finetune_tokens=plan.finetune.num_tokens if plan.finetune is not None else 0,
            backward_tokens=plan.backward.num_tokens if plan.backward is not None else 0,
            attention_work=shape.attention_work, predicted_ms=predicted, measured_ms=self.last_step_ms,
        ))

    def _finalize(self, req: Request, now: float) -> RequestOutput:
        o = self._outputs.pop(req.request_id)
        det = self._detok.pop(req.request_id)
        self._requests.pop(req.request_id, None)
        if det is not None:
            o.delta_text = det.take_delta(final=True)
            o.text = det.text
        else:
            o.delta_text = ""
        o.finished = True
        o.finish_reason = req.finish_reason.value if req.finish_reason else None
        o.finish_time = now
        o.num_preemptions = req.num_preemptions
        return o

    # ---- batch and streaming APIs --------------------------------------------------------
    def _add_all(self, prompts, params, adapter) -> list[str]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = as_params_list(params, len(prompts))
        adapters = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"got {len(adapters)} adapter names for {len(prompts)} prompts")
        ids = []
        try:
            for i, (p, sp, a) in enumerate(zip(prompts, plist, adapters)):
                ids.append(self.add_request(p, sp, a, index=i))
        except Exception:
            for rid in ids:  # all or nothing
                self.abort(rid)
            raise
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished :class:`RequestOutput` per prompt, in order.

        Args:
            prompts: one prompt or a list (text or token ids each).
            params: one :class:`SamplingParams` for all, or one per prompt.
            adapter: adapter name for all, or one per prompt (``None``: base model).
        Raises:
            ValueError, AdapterError: as :meth:`add_request`; nothing is queued then.
        """
        ids = self._add_all(prompts, params, adapter)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for o in self.step():
                if o.finished and o.request_id in ids:
                    done[o.request_id] = o
            if not self.has_unfinished and len(done) < len(ids):  # pragma: no cover - defensive
                raise RuntimeError("the engine went idle with requests unfinished")
        return [done[i] for i in ids]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
    ) -> Iterator[RequestOutput]:
        """Like :meth:`generate`, but yields an output each time a request gets tokens; read
        ``.delta_text`` / ``.delta_token_ids`` and ``.index``. Closing the iterator early aborts
        the unfinished requests."""
        ids = set(self._add_all(prompts, params, adapter))
        pending = set(ids)
        try:
            while pending:
                for o in self.step():
                    if o.request_id in ids:
                        if o.finished:
                            pending.discard(o.request_id)
                        yield dataclasses.replace(o, token_ids=list(o.token_ids))
        finally:
            for rid in pending:
                self.abort(rid)
