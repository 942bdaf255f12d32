"""The notebook-facing inference engine (vLLM's ``LLM`` / ``LLMEngine`` in one class).

``Engine`` owns the model, the paged KV cache on the device, the compiled step of every bucket,
the host-side scheduler and the adapters. One :meth:`Engine.step` = schedule (host) -> build the
padded inputs (host) -> run the compiled step (device) -> append sampled tokens, detokenize,
check stop conditions (host). :meth:`Engine.generate` and :meth:`Engine.stream` loop over steps.

Not thread-safe: one thread drives an engine (the server runs it in its own loop thread).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coserve_jax.engine.detokenizer import IncrementalDetokenizer
from coserve_jax.engine.outputs import RequestOutput
from coserve_jax.engine.step import Bucket, CompiledStep, configure_compilation_cache, make_buckets, pick_bucket
from coserve_jax.engine.step_inputs import build_step_inputs
from coserve_jax.kernels.paged_attention import IMPLEMENTATIONS, default_implementation
from coserve_jax.lora.manager import AdapterError, AdapterManager
from coserve_jax.lora.peft_io import LoRAWeights
from coserve_jax.lora.pool import LoRAPoolConfig
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.models.decoder import CausalLM
from coserve_jax.models.loader import load_model
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request, RequestStatus
from coserve_jax.sched.sampling_params import SamplingParams, as_params_list
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig

Prompt = str | Sequence[int]

DEFAULT_CACHE_DIR = os.environ.get("COSERVE_JAX_CACHE_DIR", os.path.join(pathlib.Path.home(), ".cache", "coserve_jax", "xla"))


def _eos_ids(path: str | os.PathLike | None, config: ModelConfig, tokenizer) -> frozenset[int]:
    ids = set(config.eos_token_ids)
    if path is not None:
        gen = pathlib.Path(path) / "generation_config.json"
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
        model: a local Hugging Face checkpoint directory (Llama / Qwen2 / Mistral), or a built
            :class:`CausalLM` (then ``dtype``, ``max_loras`` ... of the model are used as built).
        tokenizer: a tokenizer directory, a ``transformers`` tokenizer, or ``None``: the model
            directory's tokenizer if it has one, else token ids only (``.text`` stays empty).
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
    Raises:
        ValueError: inconsistent limits (e.g. a cache too small for one ``max_model_len`` sequence).
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
    ):
        configure_compilation_cache(compilation_cache_dir)
        path = None
        if isinstance(model, CausalLM):
            self.model = model
        else:
            path = model
            lora = LoRAPoolConfig(max_loras, max_lora_rank, tuple(lora_target_modules)) if max_loras > 0 else None
            self.model = load_model(model, dtype=dtype, lora=lora, max_model_len=max_model_len)
        config = self.model.config
        self.config = config
        self.max_model_len = min(max_model_len or config.max_model_len, config.max_model_len)
        self.tokenizer = self._tokenizer(tokenizer, path)
        self.eos_token_ids = _eos_ids(path, config, self.tokenizer)
        self.adapters = AdapterManager(self.model) if self.model.lora is not None else None
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if max_logprobs < 1:
            raise ValueError(f"max_logprobs must be >= 1, got {max_logprobs}")
        self.max_logprobs = min(max_logprobs, config.vocab_size)

        # KV cache: [L, P, page_size, Hkv, D] for K and for V.
        self.page_size = page_size
        self.max_pages_per_seq = -(-self.max_model_len // page_size)
        dtype_ = self.model.dtype
        page_bytes = 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * jnp.dtype(dtype_).itemsize
        if num_kv_pages is None:
            num_kv_pages = self._default_num_pages(page_bytes, max_num_seqs, kv_cache_memory_fraction)
        shape = (config.num_layers, num_kv_pages, page_size, config.num_kv_heads, config.head_dim)
        self.kv_cache_bytes = page_bytes * num_kv_pages
        kv = KVCacheManager(num_kv_pages, page_size)
        if watermark_pages is None:
            watermark_pages = max(1, kv.capacity // 100)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs, max_num_batched_tokens, self.max_model_len, watermark_pages), kv
        )
        self.k_cache = jnp.zeros(shape, dtype_)
        self.v_cache = jnp.zeros(shape, dtype_)

        impl = default_implementation() if attention_impl == "auto" else attention_impl
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be 'auto' or one of {IMPLEMENTATIONS}, got {attention_impl!r}")
        self.attention_impl = impl
        self.buckets: list[Bucket] = make_buckets(max_num_batched_tokens, max_num_seqs, token_buckets, seq_buckets)
        self._state = nnx.state(self.model)
        self._step = CompiledStep(
            self.model, self.buckets, self.max_pages_per_seq, self.k_cache, self.v_cache,
            impl=impl, max_logprobs=self.max_logprobs,
        )
        self.compile_seconds = self._step.compile_all()
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._outputs: dict[str, RequestOutput] = {}
        self._detok: dict[str, IncrementalDetokenizer | None] = {}
        self._requests: dict[str, Request] = {}
        self.num_steps = 0

    # ---- construction helpers ------------------------------------------------------------
    @staticmethod
    def _tokenizer(tokenizer, path):
        if tokenizer is None and path is not None:
            p = pathlib.Path(path)
            if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                tokenizer = p
        if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        from coserve_jax.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)

    def _default_num_pages(self, page_bytes: int, max_num_seqs: int, fraction: float) -> int:
        per_seq = self.max_pages_per_seq
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] * fraction - stats.get("bytes_in_use", 0)
            pages = int(free // page_bytes)
            if pages <= per_seq:
                raise ValueError(
                    f"only {max(pages, 0)} KV pages fit in {fraction:.0%} of device memory; one "
                    f"max_model_len={self.max_model_len} sequence needs {per_seq}: lower max_model_len"
                )
            return pages
        return max(per_seq + 1, min(max_num_seqs * per_seq + 1, (1 << 30) // page_bytes))

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
        self.adapters.load(name, peft_dir)
        self._state = nnx.state(self.model)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's slot.

        Raises:
            AdapterError: unknown name, or unfinished requests still use it.
        """
        if self.adapters is None:
            raise AdapterError("this engine has no LoRA pool (max_loras=0)")
        index = self.adapters.adapter_index(name)
        users = [r.request_id for r in self._requests.values() if r.adapter_index == index]
        if users:
            raise AdapterError(f"adapter {name!r} is in use by {len(users)} unfinished request(s)")
        self.adapters.unload(name)
        self._state = nnx.state(self.model)

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return [] if self.adapters is None else self.adapters.names

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        *,
        request_id: str | None = None,
        index: int = 0,
    ) -> str:
        """Queue one request. Returns its id.

        Args:
            prompt: text (tokenized with the engine's tokenizer, special tokens added as the
                tokenizer does by default) or token ids.
            params: sampling settings (default ``SamplingParams()``).
            adapter: name of a loaded adapter, or ``None`` for the base model.
            request_id: an id of your own (default: a fresh one).
            index: copied into the outputs (position in a batch call).
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
            eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic(),
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
        requests are live objects that later steps update; copy what you keep."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        bucket = pick_bucket(self.buckets, plan.num_tokens, plan.num_seqs)
        inputs = build_step_inputs(plan, bucket, self.page_size, self.max_pages_per_seq)
        self.k_cache, self.v_cache, out = self._step(bucket, self._state, self.k_cache, self.v_cache, inputs)
        tokens, chosen, top_ids, top_lp = (np.asarray(a) for a in out)
        now = time.monotonic()
        self.num_steps += 1
        sampled = [int(tokens[i]) if c.sample else None for i, c in enumerate(plan.chunks)]
        self.scheduler.update(plan, sampled)
        results = []
        for i, c in enumerate(plan.chunks):
            if not c.sample:
                continue
            req = c.request
            o = self._outputs.get(req.request_id)
            if o is None:  # aborted meanwhile
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
