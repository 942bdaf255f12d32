"""The engine's resolved configuration, held once: every limit, the bucket grids and the layouts.

:class:`EngineConfig` is built by :meth:`EngineConfig.resolve` from ``Engine(...)``'s keyword
arguments and the loaded model (defaults filled in, limits checked), then frozen. The scheduler
(:meth:`EngineConfig.scheduler_config`), the model runner, the policies and the start-up profile
all read it; nothing else holds a copy of a limit. It is plain data (vLLM's ``VllmConfig`` plays
the same part), so it pickles and prints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

from coserve_jax.engine.step import Bucket, make_buckets, powers_of_two
from coserve_jax.finetune.fused import FinetuneLayout
from coserve_jax.kernels.paged_attention import IMPLEMENTATIONS, default_implementation
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.sched.policy import POLICY_OPTIONS, SLOConfig
from coserve_jax.sched.scheduler import SchedulerConfig

log = logging.getLogger("coserve_jax.engine")

REFERENCE_DEFAULT_MAX_MODEL_LEN = 2048
"""The default context length when the attention is the pure-JAX reference (CPU). The reference
gathers only the live context's pages (bucketed, :func:`~coserve_jax.kernels.reference.page_width_buckets`),
but every factor of 4 of context adds a gather width to compile into every step, and a
checkpoint's long context (8192 for SmolLM2, 131072 for Llama 3.1) sizes the default KV cache and
each step's page table; pass ``max_model_len`` to go past it."""


def finetune_length_buckets(max_len: int, dense_up_to: int = 512) -> list[int]:
    """The default training-sequence length buckets (tokens), ascending, ending at ``max_len``:
    from 64, quarter-octave steps (``p, 1.25 p, 1.5 p, 1.75 p`` for powers of two ``p``) up to
    ``dense_up_to``, half-octave steps (``p, 1.5 p``) above it.

    A sequence pads to the next bucket: at most 1.25x its length where chat finetuning data
    mostly lies (16 GSM8K chat examples in SmolLM2's template: 132 to 468 tokens), at most 1.5x above,
    so long contexts do not multiply the executables (each length compiles a backward and a
    train step). For 512: 13 buckets; for 2048: 17.

    Raises:
        ValueError: ``max_len < 1``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = set()
    for p in powers_of_two(min(64, max_len), max_len):
        steps = (4, 5, 6, 7) if p < dense_up_to else (4, 6)
        out.update(p * k // 4 for k in steps if p * k // 4 < max_len)
    out.add(max_len)
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every limit and static shape of one engine (all resolved; :meth:`resolve` says what each
    knob means).

    Attributes:
        max_model_len: context length (tokens), at most the model's.
        max_num_seqs: most sequences running at once and in one step.
        max_num_batched_tokens: token budget of one step.
        page_size: tokens per KV page; num_kv_pages: pages in the cache (page 0 is scratch);
            watermark_pages: free pages admission keeps for running requests to grow into.
        kv_cache_bytes: bytes of K and V cache on each device.
        max_loras, max_lora_rank, lora_target_modules: the adapter pool (``max_loras`` 0: none).
        max_cpu_loras: most adapters' weights kept in host memory off the device slots (``None``: no limit).
        max_loras_per_batch: most distinct adapters in one step (0 without a pool).
        lora_impl: how the step applies adapters: ``"segmented"`` or ``"onehot"``.
        max_logprobs: most top logprobs a request may ask for (at most the vocabulary).
        buckets: the compiled step shapes, ascending.
        attention_impl: the attention implementation in use (never ``"auto"``).
        finetune: the finetuning buffers' layout, or ``None`` without finetuning.
        max_finetune_tokens: most finetuning forward tokens in one step (0 without finetuning).
        scheduling_policy, policy_options: the step policy at start-up (:mod:`coserve_jax.sched.policy`).
        slo: default SLOs and the hybrid policy's knobs.
        measure_steps: time every step on the device.
        async_scheduling: overlap steps: plan step N+1 while the device runs step N.
        tensor_parallel_size: devices the model is split over.
        seed: seeds the per-request seeds of requests that give none.
        compilation_cache_dir: the persistent XLA compilation cache (``None``: off).
        finetune_idle_train_step: steps without inference run whole training sequences as one
            train step (finetuning on, one device).
        compile_in_background: serve once the largest shapes are compiled, the rest compiling in
            a background thread (one process only).
        enable_prefix_caching: share the KV pages of repeated prompt prefixes
            (:mod:`coserve_jax.sched.kv_cache`).
    """

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    page_size: int
    num_kv_pages: int
    watermark_pages: int
    kv_cache_bytes: int
    max_loras: int
    max_lora_rank: int
    lora_target_modules: tuple[str, ...]
    max_logprobs: int
    buckets: tuple[Bucket, ...]
    attention_impl: str
    finetune: FinetuneLayout | None
    max_finetune_tokens: int
    scheduling_policy: str = "fixed"
    policy_options: tuple[tuple[str, object], ...] = ()
    slo: SLOConfig = SLOConfig()
    measure_steps: bool = False
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    compilation_cache_dir: str | None = None
    max_cpu_loras: int | None = None
    finetune_idle_train_step: bool = False
    compile_in_background: bool = False
    enable_prefix_caching: bool = True
    max_loras_per_batch: int = 0
    lora_impl: str = "segmented"

    @property
    def lora_groups(self) -> int:
        """``G`` of the step's grouped LoRA GEMMs (0: the one-hot path, or no pool)."""
        return self.max_loras_per_batch if self.lora_impl == "segmented" else 0

    @property
    def max_pages_per_seq(self) -> int:
        """Page-table width: ``ceil(max_model_len / page_size)``."""
        return -(-self.max_model_len // self.page_size)

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """The compiled token-slot counts, ascending."""
        return tuple(sorted({b.num_tokens for b in self.buckets}))

    @property
    def bucket_shapes(self) -> tuple[tuple[int, int], ...]:
        """The compiled step shapes as plain ``(T, S)`` pairs, ascending (what the host-side
        policies plan with)."""
        return tuple((b.num_tokens, b.num_seqs) for b in self.buckets)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        """The compiled sequence-slot counts, ascending."""
        return tuple(sorted({b.num_seqs for b in self.buckets}))

    @property
    def backward_buckets(self) -> tuple[int, ...]:
        """The sequence lengths the backward slice is compiled for (empty without finetuning)."""
        return self.finetune.seq_buckets if self.finetune is not None else ()

    @property
    def finetune_rows(self) -> int:
        """Rows of the activation store's arrays (:attr:`FinetuneLayout.num_rows`; 0 without finetuning)."""
        return self.finetune.num_rows if self.finetune is not None else 0

    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler's view of the limits."""
        return SchedulerConfig(
            self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len, self.watermark_pages,
            self.max_finetune_tokens, self.finetune.store_rows if self.finetune is not None else 1 << 62,
            self.finetune_idle_train_step, self.max_loras_per_batch if self.lora_impl == "segmented" else 0,
        )

    @classmethod
    def resolve(
        cls,
        model_config: ModelConfig,
        *,
        has_lora_pool: bool,
        kv_cache_heads: int,
        dtype_itemsize: int,
        device_memory: Mapping[str, int] | None = None,
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
        compilation_cache_dir: str | os.PathLike | None = None,
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
    ) -> "EngineConfig":
        """Fill in the defaults of ``Engine(...)``'s keyword arguments and check them.

        Args:
            model_config: the loaded model's configuration.
            has_lora_pool: whether the model has an adapter pool (finetuning needs one).
            kv_cache_heads: KV heads the cache holds over all devices (one replicated head per
                device when ``tensor_parallel_size`` exceeds the model's KV heads).
            dtype_itemsize: bytes per cache element (the model dtype's).
            device_memory: the first device's ``memory_stats()`` (``bytes_limit``,
                ``bytes_in_use``; ``None`` or without ``bytes_limit`` off GPUs): sizes the
                default cache.
            max_model_len: context length in tokens (default: the checkpoint's; with the
                reference attention, i.e. on CPU, at most :data:`REFERENCE_DEFAULT_MAX_MODEL_LEN`,
                with a warning when that cuts the checkpoint's).
            max_num_seqs: most sequences running at once (and in one step).
            max_num_batched_tokens: token budget of one step (prefill chunks + decode tokens).
            page_size: tokens per KV page.
            num_kv_pages: pages in the KV cache (page 0 is scratch). Default: the fraction
                ``kv_cache_memory_fraction`` of the device memory left after the weights, on devices
                that report memory (GPU); elsewhere enough for ``max_num_seqs`` full-length sequences,
                at most 1 GiB.
            kv_cache_memory_fraction: see ``num_kv_pages``.
            max_loras: adapter slots (0: no LoRA pool).
            max_cpu_loras: most adapters whose weights are kept in host memory while off the
                device slots (vLLM's name; ``None``: no limit). Past it, adapters that have a
                directory on disk are read back from it when needed; others always stay.
            max_loras_per_batch: most distinct adapters in one step (SGLang's name; here the base
                model is not counted). Default ``min(max_loras, 4)``. The scheduler admits a
                request with an adapter no running request uses only while fewer than this many
                are in use, and a finetuning chunk likewise; the step's LoRA GEMMs cost about
                this many adapters' work where XLA expands grouped GEMMs densely (its CPU
                backend), one adapter's on a grouped-GEMM backend, and never grow with ``max_loras``.
            lora_impl: ``"segmented"`` (tokens grouped by adapter, grouped GEMMs over the step's
                adapters: :func:`~coserve_jax.models.lora_pool.segmented_lora_delta`) or
                ``"onehot"`` (a one-hot contraction over every slot, the reference:
                :func:`~coserve_jax.models.lora_pool.lora_delta`; no per-step adapter limit).
            max_lora_rank: rank every slot is padded to.
            lora_target_modules: modules the pool covers (default: all seven linear layers).
            max_logprobs: most top logprobs a request may ask for.
            token_buckets, seq_buckets: step shapes to compile (default: powers of two of
                ``T``, each with ``S = min(T, max_num_seqs)``; ``seq_buckets`` given: the ``T x S``
                grid; see :func:`coserve_jax.engine.step.make_buckets`).
            attention_impl: ``"auto"`` (Pallas on GPU, the pure-JAX reference elsewhere), or one of
                :data:`coserve_jax.kernels.paged_attention.IMPLEMENTATIONS`.
            compilation_cache_dir: persistent XLA compilation cache (``None``: off; ``Engine``'s
                default is ``$COSERVE_JAX_CACHE_DIR`` or ``~/.cache/coserve_jax/xla``).
            seed: seeds the per-request seeds of requests that give none.
            watermark_pages: free pages admission keeps for running requests to grow into
                (default: 1% of the cache, at least 1).
            max_finetune_jobs: finetuning jobs that can train at once (0: no finetuning; needs a
                LoRA pool).
            finetune_max_seq_len: longest training sequence in tokens (default
                ``min(max_model_len, 2048)``); short examples are packed into sequences of up to
                this length.
            max_finetune_tokens: most finetuning forward tokens in one step (default: all of
                ``max_num_batched_tokens`` that inference leaves).
            finetune_layers_per_slice: decoder layers of backward work per step while inference
                runs, under policies that do not size the backward themselves (``"fixed"``,
                ``"fixed_budget"``; divides the number of layers). A step with no inference work
                runs a sequence's whole remaining backward; ``"hybrid"`` runs as many layers as
                the latency model says fit.
            finetune_seq_buckets: sequence lengths the backward and the idle train step are
                compiled for (default: :func:`finetune_length_buckets`, quarter-octave steps up to
                512 tokens and half-octave steps above).
            finetune_activation_bytes: device bytes of the activation store, which holds each
                training sequence in flight's saved layer inputs (``num_layers x hidden`` values
                of the model dtype a token) and boundary gradient (``hidden`` float32 values a
                token), shared by all jobs (default: two ``finetune_max_seq_len`` sequences per
                job). More lets more sequences be in flight at once.
            finetune_idle_train_step: in a step with no inference work (nothing running or
                waiting), run a training sequence whose forward has not started as one train
                step: forward, loss and backward in one executable that keeps the projections'
                outputs for the backward instead of recomputing them from saved layer inputs
                (the same gradient, about a third less work than the token-level forward and
                backward; one executable per ``finetune_seq_buckets`` length). Single device
                only (under tensor parallelism the token-level path runs).
            compile_in_background: start serving once the largest step bucket and the longest
                backward are compiled (or loaded from the executable cache) and compile the other
                shapes in a background thread; meanwhile a step runs in the smallest compiled
                bucket that holds it (padded: slower, the same tokens) and idle steps train
                token-level until the idle train step is compiled. ``Engine.wait_compiled``
                waits for the rest. Ignored in a multi-process engine (every process must run
                the same shapes).
            enable_prefix_caching: automatic prefix caching (vLLM's knob, on by default): full
                KV pages are named by content, adapter and adapter version, a new request shares
                the longest cached chain and prefills the rest, and freed pages stay cached until
                evicted (LRU); an adapter's every load, unload and optimizer step gives its pages
                new names (:mod:`coserve_jax.sched.kv_cache`).
            scheduling_policy: ``"fixed"`` (the step budgets above, every step), ``"hybrid"``
                (each step sized from the latency model and the requests' SLOs,
                :mod:`coserve_jax.sched.hybrid_policy`; the model is fitted from a start-up profile,
                cached beside the compilation cache, and refined from every measured step), or a
                baseline of :mod:`coserve_jax.sched.baseline_policies`: ``"fixed_budget"``,
                ``"temporal"`` (see :meth:`Engine.set_scheduling_policy
                <coserve_jax.engine.engine.Engine.set_scheduling_policy>`).
            policy_options: keyword arguments of that policy (as ``Engine.set_scheduling_policy``).
            slo: default SLOs and policy knobs (:class:`SLOConfig` or a dict of its fields) for
                ``"hybrid"``.
            measure_steps: time every step on the device (one sync per step) and log it with the
                latency model's prediction in ``Engine.step_log`` (always on under ``"hybrid"``).
            async_scheduling: overlap steps (vLLM's name; on by default): plan and build step N+1
                while the device runs step N; ``Engine.step`` then returns step N's outputs one call
                late (``False``: the synchronous loop, each step's outputs from its own call). Tokens are the
                same either way; a request's end (EOS, a stop string) is seen one step late, so its
                last step may compute one token that is thrown away. Measuring steps
                (``measure_steps``, ``"hybrid"``) waits for each step, which undoes the overlap.
            tensor_parallel_size: devices the model is split over, Megatron-style, with LoRA
                adapters and finetuning state split by the same rule (:mod:`coserve_jax.parallel.rules`;
                ``docs/parallelism.md``). The first ``tensor_parallel_size`` of ``jax.devices()``
                (all processes') are used.
        Raises:
            ValueError: inconsistent limits (a cache too small for one ``max_model_len``
                sequence, a slice size that does not divide the layers, bad buckets, an unknown
                attention implementation or policy).
        """
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if max_logprobs < 1:
            raise ValueError(f"max_logprobs must be >= 1, got {max_logprobs}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_cpu_loras is not None and max_cpu_loras < 0:
            raise ValueError(f"max_cpu_loras must be >= 0, got {max_cpu_loras}")
        if lora_impl not in ("segmented", "onehot"):
            raise ValueError(f"lora_impl must be 'segmented' or 'onehot', got {lora_impl!r}")
        if max_loras_per_batch is not None and max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {max_loras_per_batch}")
        if max_finetune_jobs < 0:
            raise ValueError(f"max_finetune_jobs must be >= 0, got {max_finetune_jobs}")
        if scheduling_policy not in POLICY_OPTIONS:
            raise ValueError(f"scheduling_policy must be one of {sorted(POLICY_OPTIONS)}, got {scheduling_policy!r}")
        impl = default_implementation() if attention_impl == "auto" else attention_impl
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be 'auto' or one of {IMPLEMENTATIONS}, got {attention_impl!r}")
        ctx = min(max_model_len or model_config.max_model_len, model_config.max_model_len)
        if max_model_len is None and impl == "reference" and ctx > REFERENCE_DEFAULT_MAX_MODEL_LEN:
            log.warning(
                "max_model_len defaults to %d, not the checkpoint's %d, with the reference attention (CPU): a long "
                "context adds compiled gather widths and KV cache; pass max_model_len to choose",
                REFERENCE_DEFAULT_MAX_MODEL_LEN, ctx,
            )
            ctx = REFERENCE_DEFAULT_MAX_MODEL_LEN
        per_seq = -(-ctx // page_size)
        local_heads = kv_cache_heads // tensor_parallel_size
        page_bytes = 2 * model_config.num_layers * page_size * local_heads * model_config.head_dim * dtype_itemsize
        if num_kv_pages is None:
            stats = device_memory or {}
            if "bytes_limit" in stats:
                free = stats["bytes_limit"] * kv_cache_memory_fraction - stats.get("bytes_in_use", 0)
                num_kv_pages = int(free // page_bytes)
                if num_kv_pages <= per_seq:
                    raise ValueError(
                        f"only {max(num_kv_pages, 0)} KV pages fit in {kv_cache_memory_fraction:.0%} of device memory; "
                        f"one max_model_len={ctx} sequence needs {per_seq}: lower max_model_len"
                    )
            else:
                num_kv_pages = max(per_seq + 1, min(max_num_seqs * per_seq + 1, (1 << 30) // page_bytes))
        if watermark_pages is None:
            watermark_pages = max(1, (num_kv_pages - 1) // 100)
        layout = None
        if max_finetune_jobs and has_lora_pool:
            n_max = min(finetune_max_seq_len or min(ctx, 2048), ctx)
            if finetune_layers_per_slice < 1 or model_config.num_layers % finetune_layers_per_slice:
                raise ValueError(
                    f"finetune_layers_per_slice={finetune_layers_per_slice} must divide num_layers={model_config.num_layers}"
                )
            if finetune_seq_buckets:
                seq_b = sorted(set(finetune_seq_buckets))
            else:
                seq_b = finetune_length_buckets(n_max)
            if seq_b[-1] != n_max:
                raise ValueError(f"the largest finetune_seq_buckets entry must be finetune_max_seq_len={n_max}, got {seq_b}")
            rows = 0
            if finetune_activation_bytes is not None:
                per_token = model_config.num_layers * model_config.hidden_size * dtype_itemsize + model_config.hidden_size * 4
                rows = finetune_activation_bytes // per_token
                if rows < n_max:
                    raise ValueError(
                        f"finetune_activation_bytes={finetune_activation_bytes} holds {rows} tokens ({per_token} bytes each); "
                        f"one finetune_max_seq_len={n_max} sequence needs {n_max * per_token}"
                    )
            layout = FinetuneLayout(max_finetune_jobs, n_max, finetune_layers_per_slice, tuple(seq_b), rows)
        ft_tokens = 0
        if layout is not None:
            ft_tokens = min(max_finetune_tokens or max_num_batched_tokens, max_num_batched_tokens)
            if ft_tokens < 1:
                raise ValueError(f"max_finetune_tokens must be >= 1, got {max_finetune_tokens}")
        return cls(
            max_model_len=ctx, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            page_size=page_size, num_kv_pages=num_kv_pages, watermark_pages=watermark_pages,
            kv_cache_bytes=page_bytes * num_kv_pages,
            max_loras=max_loras if has_lora_pool else 0, max_lora_rank=max_lora_rank,
            lora_target_modules=tuple(lora_target_modules),
            max_logprobs=min(max_logprobs, model_config.vocab_size),
            buckets=tuple(make_buckets(max_num_batched_tokens, max_num_seqs, token_buckets, seq_buckets)),
            attention_impl=impl, finetune=layout, max_finetune_tokens=ft_tokens,
            scheduling_policy=scheduling_policy, policy_options=tuple(sorted((policy_options or {}).items())),
            slo=slo if isinstance(slo, SLOConfig) else SLOConfig(**(slo or {})), measure_steps=measure_steps,
            async_scheduling=bool(async_scheduling), tensor_parallel_size=tensor_parallel_size, seed=seed,
            compilation_cache_dir=None if compilation_cache_dir is None else os.fspath(compilation_cache_dir),
            max_cpu_loras=max_cpu_loras,
            finetune_idle_train_step=bool(finetune_idle_train_step and layout is not None and tensor_parallel_size == 1),
            compile_in_background=bool(compile_in_background),
            enable_prefix_caching=bool(enable_prefix_caching),
            max_loras_per_batch=min(max_loras, max_loras_per_batch or 4) if has_lora_pool and max_loras else 0,
            lora_impl=lora_impl,
        )
