"""Continuous-batching inference scheduler: which tokens of which requests go into the next step.

Each call of :meth:`Scheduler.schedule` plans one step under two limits, a token budget
(``max_num_batched_tokens``) and a sequence limit (``max_num_seqs``):

1. **Decode first**: every running request whose tokens are all computed but its last sampled
   one gets that one token (Sarathi-Serve's stall-free batching, Agrawal et al., OSDI 2024).
2. **Chunked prefill**: running requests part-way through their prompt get the next chunk, as
   large as the remaining budget allows.
3. **Admission**: waiting requests, in priority order (vLLM's ``priority``: lower first) and
   first come first served within a priority, are admitted while the budget, the sequence limit
   and the free pages (above a watermark kept for running requests to grow) allow; a request that
   does not fit blocks those behind it, so none starves within its priority. When the request at
   the head of the queue outranks running requests and lacks a seat or pages, the lowest-ranked
   of them (the latest admitted among equals) are preempted for it first, as vLLM's priority
   policy preempts for pages (here for seats too: a chat request need not wait for a batch of
   low-priority RL samples to finish). A request whose
   LoRA adapter waits for a device slot (``adapter_index`` :data:`~coserve_jax.sched.request.ADAPTER_PENDING`)
   is passed over, as vLLM passes over requests beyond ``max_loras``, until the engine places it.

**Prefix caching** (with the cache's ``enable_prefix_caching``): an admitted request first takes
the longest chain of its full pages already cached (named by content, adapter and adapter
version, :func:`~coserve_jax.sched.kv_cache.page_hash`) and prefills only the rest; its own full
pages are named as soon as a planned chunk computes them, so a request admitted later, in the
same step or after, shares them (within a step every K/V write of a layer precedes that layer's
attention). At least the last token is always computed, in a page of its own, so a shared page is
never written. A request with a repetition penalty computes its whole prompt (its seen-token mask
is built from the tokens its steps pass through) but still names its pages.

Pages come from :class:`~coserve_jax.sched.kv_cache.KVCacheManager`. When a running request needs
a page and none is free, the lowest-ranked running request not yet planned in this step (the
most recently admitted among equal priorities) is **preempted by recomputation** (vLLM's
default): its pages are freed and it goes back to the front of its priority class in the queue
with its generated tokens, all of which the next prefill recomputes. No new request is admitted
in a step that preempted for a running request's pages.

**Finetuning** (token-level, :mod:`coserve_jax.sched.finetune`) takes what inference leaves:

4. **Forward chunks**: with budget and sequence slots left, training sequences in their forward
   phase (the jobs in round robin, each job's sequences in order) get their next chunks, up to
   ``max_finetune_tokens`` tokens in all, while their pages fit above the watermark and the
   activation store has rows for them; a chunk of a pack is one sequence of the step per example
   it touches. Inference that runs out of pages frees a training sequence's pages before it
   preempts a request (the sequence's forward restarts later).
   With ``idle_train_step``, a step with no inference work instead runs a sequence whose forward
   has not started as one train step (:class:`~coserve_jax.sched.outputs.TrainSequence`:
   forward, loss and backward in one executable; no pages or store rows).
5. **Backward**: one training sequence in its backward phase (round robin over the jobs, each
   job's oldest first) gets its next layers, top down: as many as the step's policy allows, by
   default ``layers_per_slice`` while inference runs and every remaining layer when the step has
   no inference work (the whole backward in one step).

After the device ran the step, :meth:`Scheduler.update` appends the sampled tokens and applies
the token-level stop conditions (EOS ids unless ``ignore_eos``, ``stop_token_ids``,
``max_tokens``, the context length); stop strings need text and are the engine's
(:meth:`Scheduler.finish`).

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Hashable, Iterable

from coserve_jax.sched.finetune import StoreAllocator, TrainingPhase, TrainingSequence
from coserve_jax.sched.outputs import (
    PENDING_TOKEN, BackwardSlice, DecodeChunks, FinetuneChunk, SamplingRow, ScheduledChunk, SchedulerOutput, StepResult,
    TrainSequence,
)
from coserve_jax.sched.policy import Load, StepBudget, StepPolicy
from coserve_jax.sched.kv_cache import KVCacheManager, page_hash
from coserve_jax.sched.request import FinishReason, Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step.

    Attributes:
        max_num_seqs: most sequences in one step (and running at once).
        max_num_batched_tokens: token budget of one step (decode tokens + prefill chunks).
        max_model_len: context length: prompt + output tokens of one request.
        watermark_pages: free pages admission (and finetuning) leave for running requests to
            grow into.
        max_finetune_tokens: most finetuning forward tokens in one step (0: no finetuning).
        store_rows: rows (tokens) of the activation store that training sequences' saved layer
            inputs share (default: no limit).
        idle_train_step: a step with no inference work runs a training sequence whose forward
            has not started as one train step (:class:`~coserve_jax.sched.outputs.TrainSequence`).
        max_loras_per_batch: most distinct LoRA adapters (base model not counted) among the
            running requests and a step's finetuning chunks (0: no limit). A waiting request
            whose adapter no running request uses is passed over while the limit is reached.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    watermark_pages: int = 0
    max_finetune_tokens: int = 0
    store_rows: int = 1 << 62
    idle_train_step: bool = False
    max_loras_per_batch: int = 0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    """Continuous batching with decode-first chunked prefill and preemption by recomputation.

    Args:
        config: step limits.
        kv_cache: the page allocator (its pages are the device cache's).
        policy: optional :class:`~coserve_jax.sched.policy.StepPolicy` that sizes each
            step (used when :meth:`schedule` gets the clock): the SLO-driven
            :class:`~coserve_jax.sched.hybrid_policy.HybridPolicy` or a baseline of
            :mod:`coserve_jax.sched.baseline_policies`; without it the budgets are the config's
            fixed ones.
    Raises:
        ValueError: a cache too small for one sequence of ``max_model_len`` tokens (a lone
            request could then never finish).
    """

    adapter_versions: list[int] | None = None
    """Per adapter index, the version of its slot's weights (index 0, the base model, stays 0):
    part of every page's name, so pages computed with older weights are never matched. The
    engine hands in a list it bumps on every write to a slot; ``None``: every version 0."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, policy: StepPolicy | None = None):
        need = kv_cache.pages_for(config.max_model_len)
        if need > kv_cache.capacity:
            raise ValueError(
                f"the KV cache holds {kv_cache.capacity} pages; one sequence of max_model_len="
                f"{config.max_model_len} tokens needs {need}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order
        self.requests: dict[Hashable, Request] = {}
        self._rows: dict[Hashable, SamplingRow] = {}  # per request, built once at admission
        # per request: (the request, min_tokens, ids that stop it, most output tokens), built once
        # at admission (one lookup per decode in update)
        self._stops: dict[Hashable, tuple[Request, int, frozenset[int], int]] = {}
        self._asks: dict[Hashable, int] = {}  # top logprobs of the requests that ask for logprobs
        self._ended: list[Hashable] = []  # requests ended since the last plan (SchedulerOutput.finished)
        self._plan_pending = False  # the plan being made holds a PENDING_TOKEN
        self.num_preemptions = 0
        self.num_prefill_tokens = 0
        """Prompt (and recomputed) tokens planned in prefill chunks since start: what the prefix
        cache saves shows here."""
        self.training: list[TrainingSequence] = []  # in the order they were added
        self.store = StoreAllocator(config.store_rows)
        """Rows of the activation store, given to training sequences when their forward starts."""
        self.num_trained = 0  # examples whose training sequence is done, since start (forward-only ones included)
        self._rr_forward = 0
        self._rr_backward = 0
        self.policy = policy
        self.last_budget: StepBudget | None = None
        self._names: dict[Hashable, list[bytes]] = {}  # per running request: its named full pages, in order
        self._query_names: dict[Hashable, tuple] = {}  # per waiting request: (adapter key, its pages' names)
        self._num_ranked = 0  # unfinished requests with a priority other than 0 (none: no priority preemption)

    # ---- queue ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises:
            ValueError: duplicate id, empty prompt, or a prompt that leaves no room to generate in
                the context length, or needs more pages than the whole cache holds.
        """
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; the context length is {self.config.max_model_len} "
                "(prompt + at least one generated token must fit)"
            )
        if self.kv_cache.pages_for(n + 1) > self.kv_cache.capacity:
            raise ValueError(f"the prompt needs {self.kv_cache.pages_for(n + 1)} KV pages; the cache has {self.kv_cache.capacity}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        p = request.params
        self._rows[request.request_id] = SamplingRow(
            p.temperature, p.top_k, p.top_p, request.seed, p.logprobs, p.min_p, p.repetition_penalty)
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(request.eos_token_ids))
        self._stops[request.request_id] = (request, p.min_tokens, stop_ids, min(p.max_tokens, self.config.max_model_len - n))
        if p.logprobs is not None:
            self._asks[request.request_id] = p.logprobs
        self._num_ranked += request.priority != 0
        self._queue(request, front=False)

    def _queue(self, req: Request, front: bool) -> None:
        """Put a waiting request in the queue, kept in priority order: behind (``front=False``,
        a new request) or ahead of (``front=True``, a preempted one) the requests of its priority."""
        waiting, prio = self.waiting, req.priority
        if not waiting or (waiting[-1].priority <= prio if not front else waiting[-1].priority < prio):
            waiting.append(req)  # (every request at one priority: the common case)
            return
        for i, other in enumerate(waiting):
            if other.priority > prio or (front and other.priority == prio):
                waiting.insert(i, req)
                return
        waiting.append(req)  # pragma: no cover - the fast path above covers it

    def abort(self, request_id: Hashable) -> Request | None:
        """Cancel a request wherever it is and free its pages. Unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return req

    def finish(self, request_id: Hashable, reason: FinishReason = FinishReason.STOP) -> None:
        """End a running request (e.g. the engine matched a stop string)."""
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        if req.request_id in self.kv_cache:
            self.kv_cache.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._num_ranked -= req.priority != 0
        self.requests.pop(req.request_id, None)
        self._rows.pop(req.request_id, None)
        self._stops.pop(req.request_id, None)
        self._asks.pop(req.request_id, None)
        self._names.pop(req.request_id, None)
        self._query_names.pop(req.request_id, None)
        self._ended.append(req.request_id)

    @property
    def has_unfinished(self) -> bool:
        """Whether inference requests are waiting or running (finetuning not counted)."""
        return bool(self.waiting or self.running)

    # ---- finetuning ----------------------------------------------------------------------
    def add_training_sequence(self, seq: TrainingSequence) -> None:
        """Queue a job's next training sequence (a job may have several in flight).

        Raises:
            ValueError: finetuning is off (``max_finetune_tokens == 0``), a sequence of the job
                with the same counter is in flight, or the sequence cannot fit the KV cache, the
                context length or the activation store.
        """
        if self.config.max_finetune_tokens < 1:
            raise ValueError("this scheduler has no finetuning budget (max_finetune_tokens=0)")
        if any(s.job_id == seq.job_id and s.index == seq.index for s in self.training):
            raise ValueError(f"job {seq.job_id!r} already has training sequence {seq.index} in flight")
        longest = max(seq.segments)
        if longest > self.config.max_model_len:
            raise ValueError(f"training sequence of {longest} tokens exceeds max_model_len={self.config.max_model_len}")
        if self.kv_cache.pages_for(longest) > self.kv_cache.capacity:
            raise ValueError(f"training sequence needs {self.kv_cache.pages_for(longest)} KV pages; the cache has {self.kv_cache.capacity}")
        if not seq.forward_only and seq.num_tokens > self.store.capacity:
            raise ValueError(f"training sequence of {seq.num_tokens} tokens exceeds the activation store's {self.store.capacity} rows")
        self.training.append(seq)

    def training_sequences(self, job_id: Hashable) -> list[TrainingSequence]:
        """A job's sequences in flight, oldest first."""
        return [s for s in self.training if s.job_id == job_id]

    def remove_training(self, job_id: Hashable) -> list[TrainingSequence]:
        """Drop a job's sequences in flight (cancel) and free their pages and store rows."""
        gone = self.training_sequences(job_id)
        for seq in gone:
            self.training.remove(seq)
            self._free_pages(seq)
            self._free_store(seq)
        return gone

    def _free_pages(self, seq: TrainingSequence) -> bool:
        freed = False
        for i in range(len(seq.segments)):
            if seq.kv_id(i) in self.kv_cache:
                self.kv_cache.free(seq.kv_id(i))
                freed = True
        return freed

    def _free_store(self, seq: TrainingSequence) -> None:
        if seq.store_start is not None:
            self.store.free(seq.store_start, seq.num_tokens)
            seq.store_start = None

    def _by_job(self, phase: TrainingPhase, start: int) -> list[TrainingSequence]:
        """The sequences in ``phase``: the jobs in round robin from ``start``, each job's in order."""
        jobs: dict[Hashable, list[TrainingSequence]] = {}
        for s in self.training:
            if s.phase is phase:
                jobs.setdefault(s.job_id, []).append(s)
        if not jobs:
            return []
        order = list(jobs.values())
        k = start % len(order)
        return [s for seqs in order[k:] + order[:k] for s in seqs]

    def _preempt_training(self) -> bool:
        """Free the pages of a training sequence in its forward phase (it restarts later)."""
        for seq in reversed(self.training):
            if seq.phase is TrainingPhase.FORWARD and self._free_pages(seq):
                seq.num_computed = 0
                seq.num_restarts += 1
                return True
        return False

    def _forward_chunks(self, seq: TrainingSequence, budget: int, slots: int) -> list[FinetuneChunk]:
        """The next chunks of ``seq``'s forward (one per example touched), at most ``budget``
        tokens and ``slots`` chunks, as far as pages above the watermark allow; allocates them."""
        kv = self.kv_cache
        chunks = []
        pos = seq.num_computed
        starts = seq.segment_starts
        while budget > 0 and slots > 0 and pos < seq.num_tokens:
            i = seq.segment_of(pos)
            seg_start, seg_len = starts[i], seq.segments[i]
            local = pos - seg_start
            n = min(budget, seg_len - local)
            kid = seq.kv_id(i)
            held = len(kv.page_table(kid)) if kid in kv else 0
            need = kv.pages_for(local + n) - held
            if need + self.config.watermark_pages > kv.num_free_pages:
                break
            if kid in kv:
                kv.grow(kid, local + n)
            else:
                kv.admit(kid, local + n)
            chunks.append(FinetuneChunk(
                job_id=seq.job_id, index=seq.index, num_restarts=seq.num_restarts, offset=pos, start=local,
                token_ids=seq.token_ids[pos:pos + n], page_table=kv.page_table(kid), adapter_index=seq.adapter_index,
                store_row=-1 if seq.forward_only else seq.store_start + pos, targets=seq.targets[pos:pos + n],
                weights=seq.weights[pos:pos + n], dropout_rate=seq.dropout_rate, dropout_seed=seq.dropout_seeds[i],
                forward_only=seq.forward_only, loss_code=seq.loss_code,
                sampler_logprobs=seq.sampler_logprobs[pos:pos + n] if seq.loss_code else None, clip=seq.clip,
                return_logprobs=seq.return_logprobs,
            ))
            pos += n
            budget -= n
            slots -= 1
        return chunks

    def _schedule_finetune(
        self, budget: int, num_chunks: int, cap: int, backward_layers: int, idle: bool
    ) -> tuple[list[FinetuneChunk], BackwardSlice | None, TrainSequence | None]:
        fwd: list[FinetuneChunk] = []
        budget = min(budget, cap)
        slots = self.config.max_num_seqs - num_chunks
        train = None
        whole = idle and self.config.idle_train_step and cap > 0
        if whole:
            for seq in self._by_job(TrainingPhase.FORWARD, self._rr_forward):
                if not seq.num_computed and not seq.forward_only:
                    train = TrainSequence(
                        seq.job_id, seq.index, seq.num_restarts, seq.token_ids, seq.targets, seq.weights, seq.segments,
                        seq.grad_row, seq.adapter_index, seq.num_layers, seq.dropout_rate, seq.dropout_seeds,
                        seq.loss_code, seq.sampler_logprobs, seq.clip, seq.return_logprobs,
                    )
                    self._rr_forward += 1
                    break
        if budget > 0 and slots > 0:
            limit = self.config.max_loras_per_batch
            in_use = {r.adapter_index for r in self.running if r.adapter_index > 0} if limit else None
            for seq in self._by_job(TrainingPhase.FORWARD, self._rr_forward):
                if whole and not seq.num_computed and not seq.forward_only:
                    continue  # its own train step comes in a later step without inference
                if in_use is not None and seq.adapter_index not in in_use:
                    if len(in_use) >= limit:
                        continue  # the step already holds max_loras_per_batch adapters
                    in_use.add(seq.adapter_index)
                if seq.store_start is None and not seq.forward_only:
                    seq.store_start = self.store.allocate(seq.num_tokens)
                    if seq.store_start is None:
                        continue  # the store is full: the sequences before it must finish first
                chunks = self._forward_chunks(seq, budget, slots)
                fwd += chunks
                budget -= sum(c.num_tokens for c in chunks)
                slots -= len(chunks)
                if budget <= 0 or slots <= 0:
                    break
            if fwd:
                self._rr_forward += 1
        bwd = None
        if backward_layers:
            for seq in self._by_job(TrainingPhase.BACKWARD, self._rr_backward):
                n = seq.layers_left if backward_layers < 0 else min(backward_layers, seq.layers_left)
                if n <= 0:
                    continue
                if backward_layers < 0 and not idle:
                    n = min(seq.layers_per_slice, n)
                bwd = BackwardSlice(
                    seq.job_id, seq.index, seq.num_layers - seq.layers_done - n, n, seq.num_tokens, seq.store_start,
                    seq.grad_row, seq.adapter_index, seq.segments, seq.dropout_rate, seq.dropout_seeds,
                )
                self._rr_backward += 1
                break
        return fwd, bwd, train

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- planning ------------------------------------------------------------------------
    def load(self, now: float) -> Load:
        """What the next step could carry, for the policy."""
        defaults = getattr(self.policy, "slo", None)
        decoding, deadlines, prefill, prefill_kv, tokens_left = [], [], 0, None, []
        for r in self.running:
            left = r.num_tokens - r.num_computed_tokens
            if left == 1 and r.num_output_tokens:
                tpot = r.tpot_slo_ms or (defaults.tpot_ms if defaults else 0.0)
                decoding.append((r.num_tokens, r.first_token_time, len(r.output_token_ids), tpot))
                tokens_left.append(min(r.params.max_tokens - r.num_output_tokens, self.config.max_model_len - r.num_tokens))
            else:
                prefill += left
                if prefill_kv is None:
                    prefill_kv = r.num_computed_tokens
        prefill += sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        for r in list(self.running) + list(self.waiting):
            if r.first_token_time is None:
                ttft = (r.ttft_slo_ms or (defaults.ttft_ms if defaults else 0.0)) / 1000.0
                deadlines.append((r.arrival_time + ttft - now, ttft))
        fwd = self._by_job(TrainingPhase.FORWARD, self._rr_forward)
        bwd = self._by_job(TrainingPhase.BACKWARD, self._rr_backward)
        return Load(
            now=now, decoding=decoding, prefill_tokens=prefill, prefill_kv=prefill_kv or 0,
            queued_deadlines=deadlines, num_seqs=min(len(self.running) + len(self.waiting), self.config.max_num_seqs),
            finetune_tokens=sum(s.num_tokens - s.num_computed for s in fwd),
            finetune_kv=(fwd[0].num_computed - fwd[0].segment_starts[fwd[0].segment_of(fwd[0].num_computed)]) if fwd else 0,
            backward_tokens=bwd[0].num_tokens if bwd else 0,
            backward_layers=bwd[0].layers_left if bwd else 0,
            finetune_target_fraction=fwd[0].target_fraction if fwd else 1.0, decoding_tokens_left=tokens_left,
            trained_examples=self.num_trained,
        )

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """Plan the next step (see the module docstring); allocates the pages it needs.

        Args:
            now: the clock (seconds); with a policy, the step is sized from the SLOs.
        """
        budget = self.config.max_num_batched_tokens
        ft_cap, backward_layers, inference = self.config.max_finetune_tokens, -1, True
        self.last_budget = None
        if self.policy is not None and now is not None:
            self.last_budget = b = self.policy.decide(self.load(now))
            budget = min(budget, b.max_tokens)
            ft_cap = min(ft_cap, b.max_finetune_tokens)
            backward_layers = (b.backward_layers or -1) if b.allow_backward else 0
            inference = b.inference
        decodes = DecodeChunks()
        chunks: list[ScheduledChunk] = []
        preempted: list[Hashable] = []
        if inference and self._num_ranked and self.waiting and self.running:
            self._preempt_for_priority(budget, preempted)
        outranked = len(preempted)
        if inference:
            budget = self._schedule_running(budget, decodes, chunks, preempted)
        pressure = len(preempted) > outranked  # a running request ran out of pages
        if not pressure and inference:
            skipped = 0  # requests at the front whose adapter waits for a slot (vLLM skips them too)
            limit = self.config.max_loras_per_batch
            in_use = {r.adapter_index for r in self.running if r.adapter_index > 0} if limit and self.waiting else None
            while len(self.waiting) > skipped and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[skipped]
                a = req.adapter_index
                if a < 0 or (in_use is not None and a > 0 and a not in in_use and len(in_use) >= limit):
                    skipped += 1  # its adapter waits for a slot, or the step holds max_loras_per_batch adapters
                    continue
                if req.num_pending:
                    break  # preempted with a token still on the device: readmitted once it is known
                cached = self._match(req)
                hit = len(cached) * self.kv_cache.page_size
                n = min(req.num_tokens - hit, budget)
                if not self.kv_cache.can_admit(hit + n, reserve_pages=self.config.watermark_pages, cached=cached):
                    break  # FCFS: whoever is first waits for pages; nobody overtakes
                del self.waiting[skipped]
                if in_use is not None and a > 0:
                    in_use.add(a)
                table = self.kv_cache.admit(req.request_id, hit + n, cached)
                self._query_names.pop(req.request_id, None)
                self.kv_cache.count_query(req.num_tokens, hit)
                req.num_computed_tokens = hit
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = now
                self.running.append(req)
                chunks.append(self._chunk(req, n, table))  # a new row: the whole table
                budget -= n
        fwd, bwd, train = [], None, None
        if self.training:
            idle = not decodes.request_ids and not chunks  # no inference work in this step
            fwd, bwd, train = self._schedule_finetune(
                0 if pressure else budget, len(decodes) + len(chunks), ft_cap, backward_layers, idle)
        pending, self._plan_pending = self._plan_pending, False
        finished, self._ended = self._ended, []
        return SchedulerOutput(
            decodes=decodes, prefills=chunks, preempted=preempted, finished=finished, finetune=fwd, backward=bwd,
            train=train, has_pending_tokens=pending,
        )

    def _preempt_for_priority(self, budget: int, preempted: list[Hashable]) -> None:
        """Preempt the lowest-ranked running requests (``_pick_victim``'s order) while the request
        at the head of the queue outranks them and lacks a seat or the pages of its first chunk
        (counted without its prefix-cache hits and with the watermark, so at worst one request too
        many gives way)."""
        head = self.waiting[0]
        if budget <= 0 or head.adapter_index < 0 or head.num_pending:
            return  # it cannot be admitted this step anyway
        need = min(head.num_tokens, budget)
        limit = self.config.max_loras_per_batch
        while self.running:
            if len(self.running) < self.config.max_num_seqs and self.kv_cache.can_admit(
                    need, reserve_pages=self.config.watermark_pages):
                return
            if limit and head.adapter_index > 0:
                in_use = {r.adapter_index for r in self.running if r.adapter_index > 0}
                if head.adapter_index not in in_use and len(in_use) >= limit:
                    return  # max_loras_per_batch holds it back: seats alone would not admit it
            victim = self._pick_victim(None, DecodeChunks(), [])
            if victim.priority <= head.priority:
                return
            self._preempt(victim)
            preempted.append(victim.request_id)

    def _schedule_running(
        self, budget: int, decodes: DecodeChunks, chunks: list[ScheduledChunk], preempted: list[Hashable]
    ) -> int:
        """Plan the running requests (decodes first, then prefill chunks; admission order within
        each) into ``decodes`` and ``chunks``; returns the budget left.

        A decode's token usually lands in its request's last page: that case is the hot path
        of a busy server and is written out inline (its page count is recorded for all decodes
        at once); a decode that starts a page, and every prefill chunk, take the general path.
        """
        kv = self.kv_cache
        page = kv.page_size
        max_len = self.config.max_model_len
        running_status = RequestStatus.RUNNING
        ids, starts, new_pages = decodes.request_ids, decodes.starts, decodes.new_pages
        add_id, add_tok, add_start = ids.append, decodes.token_ids.append, starts.append
        add_out = decodes.output_index.append
        ends: list[int] = []  # tokens each decode's request holds after this plan
        add_end = ends.append
        multi: list[Request] = []
        pending = False
        for req in list(self.running):
            if preempted and req.status is not running_status:  # preempted earlier in this loop
                continue
            outs, pend, start = req.output_token_ids, req.num_pending, req.num_computed_tokens
            plen = len(req.prompt_token_ids)
            n_out = len(outs) + pend
            if plen + n_out - start > 1 or start == 0:
                multi.append(req)
                continue
            if budget == 0:
                break
            if pend and (n_out >= req.params.max_tokens or plen + n_out >= max_len):
                continue  # its pending token is its last: nothing more to compute
            rid = req.request_id
            if start % page == 0:  # the token starts a new page
                new = kv.append_page(rid)
                if new is not None:
                    new_pages[len(ids)] = (new,)
                else:  # no page free: preempt until one is
                    new = self._grow(req, start + 1, preempted, decodes, chunks)
                    if new is None:
                        continue  # preempted itself
                    if new:
                        new_pages[len(ids)] = new
            if pend:
                add_tok(PENDING_TOKEN)
                pending = True
            else:
                add_tok(outs[-1] if start >= plen else req.prompt_token_ids[start])
            add_id(rid)
            add_start(start)
            add_out(n_out)
            req.num_computed_tokens = end = start + 1
            add_end(end)
            req.num_pending = pend + 1
            budget -= 1
        kv.set_num_tokens(ids, ends)
        if self._asks:
            asks = self._asks
            decodes.num_logprobs.update((i, asks[r]) for i, r in enumerate(ids) if r in asks)
        if pending:
            self._plan_pending = True
        for req in multi:
            if budget == 0:
                break
            if req.status is not running_status or (req.num_pending and self._ends_by_length(req)):
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            new = self._grow(req, req.num_computed_tokens + n, preempted, decodes, chunks)
            if new is None:
                continue
            chunks.append(self._chunk(req, n, new))
            budget -= n
        return budget

    def _grow(
        self, req: Request, end: int, preempted: list[Hashable], decodes: DecodeChunks, chunks: list[ScheduledChunk]
    ) -> tuple[int, ...] | None:
        """Give ``req`` pages up to ``end`` tokens, preempting (training sequences first, then
        the most recently admitted request not yet planned) while none are free. Returns the new
        pages, or ``None`` when ``req`` itself had to be preempted."""
        kv = self.kv_cache
        while not kv.can_grow(req.request_id, end):
            if self._preempt_training():
                continue
            victim = self._pick_victim(req, decodes, chunks)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return None
        return kv.grow(req.request_id, end) if end > kv.num_tokens(req.request_id) else ()

    def _ends_by_length(self, req: Request) -> bool:
        """Whether the request's tokens (pending ones counted) already reach ``max_tokens`` or
        the context length."""
        return req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.config.max_model_len

    def _chunk(self, req: Request, n: int, new_pages: tuple[int, ...]) -> ScheduledChunk:
        """The chunk of ``n`` tokens; its tokens now count as computed and, if it reaches the
        last token, the token it samples is pending until :meth:`update`. (A planned request is
        never preempted later in the same plan: victims are chosen among the unplanned.)"""
        start = req.num_computed_tokens
        end = start + n
        sample = end == req.num_tokens
        req.num_computed_tokens = end
        if self.kv_cache.enable_prefix_caching:
            self._name_pages(req, min(end, len(req.prompt_token_ids) + len(req.output_token_ids)))
        out = req.num_output_tokens
        if req.num_pending:  # its input token is the one still on the device
            self._plan_pending = True
        if sample:
            req.num_pending += 1
        decode = n == 1 and start >= len(req.prompt_token_ids)
        if not decode:
            self.num_prefill_tokens += n
        return ScheduledChunk(
            req.request_id, start, req.token_ids(start, end), new_pages, sample, req.adapter_index,
            self._rows[req.request_id], out, decode,
        )

    def _adapter_key(self, req: Request) -> tuple[int, int]:
        a = req.adapter_index
        versions = self.adapter_versions
        return (a, versions[a] if versions is not None and a > 0 else 0)

    def _page_names(self, req: Request, first: int, count: int, parent: bytes | None) -> list[bytes]:
        page, key, out = self.kv_cache.page_size, self._adapter_key(req), []
        for i in range(first, first + count):
            parent = page_hash(parent, req.token_ids(i * page, (i + 1) * page), key)
            out.append(parent)
        return out

    def _match(self, req: Request) -> list[int]:
        """The cached pages a request being admitted can share (none without prefix caching,
        or for a request with a repetition penalty); their names start the request's list of
        named pages (:meth:`_name_pages`)."""
        kv = self.kv_cache
        if not kv.enable_prefix_caching:
            return []
        self._names[req.request_id] = []
        if req.params.repetition_penalty != 1.0:
            return []
        # every full page but the one holding the last token, which is always computed; kept
        # while the request waits at the head of the queue (not hashed again every step)
        key, count = self._adapter_key(req), (req.num_tokens - 1) // kv.page_size
        held = self._query_names.get(req.request_id)
        if held is not None and held[0] == key and len(held[1]) == count:
            names = held[1]
        else:
            names = self._page_names(req, 0, count, None)
            self._query_names[req.request_id] = (key, names)
        pages = kv.match(names)
        self._names[req.request_id] = names[: len(pages)]  # (the rest are named as chunks compute them)
        return pages

    def _name_pages(self, req: Request, known: int) -> None:
        """Name the full pages of ``req`` within its first ``known`` tokens (computed by planned
        chunks, their token ids known) that are not named yet."""
        names = self._names.setdefault(req.request_id, [])
        full = known // self.kv_cache.page_size
        if full > len(names):
            first = len(names)
            names += self._page_names(req, first, full - first, names[-1] if names else None)
            self.kv_cache.register(req.request_id, first, names[first:])

    def _pick_victim(self, current: Request | None, decodes: DecodeChunks, chunks: list[ScheduledChunk]) -> Request:
        """The lowest-ranked running request not yet planned this step: the highest ``priority``
        value, the most recently admitted among equals; ``current`` (the request that needs the
        pages) when none other is left or it ranks below them all (vLLM's priority policy)."""
        planned = set(decodes.request_ids)
        planned.update(c.request_id for c in chunks)
        victim = None
        for req in reversed(self.running):
            if req is not current and req.request_id not in planned and (victim is None or req.priority > victim.priority):
                victim = req
        if victim is None or (current is not None and current.priority > victim.priority):
            return current
        return victim

    def _preempt(self, req: Request) -> None:
        self.kv_cache.free(req.request_id)
        self._names.pop(req.request_id, None)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(req, front=True)

    # ---- results -------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, result: StepResult | Iterable[int | None], now: float | None = None) -> list[Request]:
        """Record a finished step.

        Args:
            output: the plan the step ran.
            result: its :class:`~coserve_jax.sched.outputs.StepResult` (or just its ``sampled``
                list): per inference chunk, in order, the sampled token id (a Python ``int``),
                or ``None`` for a chunk that did not sample.
            now: the clock when the step ended (seconds); records first-token times.
        Returns:
            The requests that finished in this step (their pages are already freed).
            Training sequences that completed their backward are in :meth:`pop_trained`.
        Raises:
            ValueError: a sampling chunk without a token, or a result of another length.
        """
        sampled = result.sampled if isinstance(result, StepResult) else list(result)
        if not output.training_recorded:
            self.update_training(output)
        d = output.decodes
        n = len(d.request_ids)
        if len(sampled) != n + len(output.prefills):
            raise ValueError(f"the result has {len(sampled)} entries; the plan has {n + len(output.prefills)} inference chunks")
        finished = []
        requests, stops = self.requests, self._stops
        for rid, token in zip(d.request_ids, sampled):  # the decodes: the hot path, inline
            live = stops.get(rid)
            if live is None:  # aborted or finished while the step ran
                continue
            req, min_tokens, stop_ids, max_out = live
            if token is None:
                raise ValueError(f"chunk of request {rid!r} samples but got no token")
            req.num_pending -= 1
            outs = req.output_token_ids
            outs.append(token)
            if req.first_token_time is None and now is not None:
                req.first_token_time = now
            k = len(outs)
            if token in stop_ids and k >= min_tokens:
                self._finish(req, FinishReason.STOP)
            elif k >= max_out:
                self._finish(req, FinishReason.LENGTH)
            else:
                continue
            finished.append(req)
        for chunk, token in zip(output.prefills, sampled[n:]):
            if not chunk.sample:
                continue
            req = requests.get(chunk.request_id)
            if req is None:
                continue
            if token is None:
                raise ValueError(f"chunk of request {req.request_id!r} samples but got no token")
            req.num_pending -= 1
            req.output_token_ids.append(int(token))
            if req.first_token_time is None and now is not None:
                req.first_token_time = now
            reason = self.stop_reason(req)
            if reason is not None:
                self._finish(req, reason)
                finished.append(req)
        return finished

    def _sequence(self, job_id: Hashable, index: int) -> TrainingSequence | None:
        for seq in self.training:
            if seq.job_id == job_id and seq.index == index:
                return seq
        return None

    def update_training(self, output: SchedulerOutput) -> None:
        """Record the training progress of a dispatched plan (forward chunks computed, backward
        layers done). It needs no result from the device, so an engine that overlaps steps records
        it before planning the next step; :meth:`update` does it otherwise. Idempotent per plan.
        An example whose forward is done gives its pages back (the backward needs no K/V); a
        sequence that is done gives its store rows back (the device runs steps in order, so the
        rows are reused only after its backward ran)."""
        if output.training_recorded:
            return
        output.training_recorded = True
        for c in output.finetune:
            seq = self._sequence(c.job_id, c.index)
            if seq is None or seq.num_restarts != c.num_restarts or seq.num_computed != c.offset:
                continue
            seq.num_computed = end = c.offset + c.num_tokens
            i = seq.segment_of(end - 1)
            if end == seq.segment_starts[i] + seq.segments[i] and seq.kv_id(i) in self.kv_cache:
                self.kv_cache.free(seq.kv_id(i))  # the example's forward is done
            self._check_done(seq)
        b = output.backward
        seq = self._sequence(b.job_id, b.index) if b is not None else None
        if seq is not None and seq.phase is TrainingPhase.BACKWARD and b.first_layer + b.num_layers == seq.num_layers - seq.layers_done:
            seq.layers_done += b.num_layers
            self._check_done(seq)
        t = output.train
        seq = self._sequence(t.job_id, t.index) if t is not None else None
        if seq is not None and seq.num_restarts == t.num_restarts and not seq.num_computed:
            seq.num_computed, seq.layers_done = seq.num_tokens, seq.num_layers
            self._check_done(seq)

    def _check_done(self, seq: TrainingSequence) -> None:
        if seq.phase is TrainingPhase.DONE:
            self._free_store(seq)
            self.num_trained += seq.num_examples

    def follow(self, output: SchedulerOutput) -> None:
        """Take a plan another process's scheduler made (multi-host: process 0 plans, the others
        run its plans). This scheduler then holds no inference requests, only the training
        sequences of the same jobs (fed by the same job logic); where the planner restarted a
        sequence's forward (its pages were taken for inference), or gave it store rows, the
        plan's chunks say so, and this copy follows before :meth:`update_training` records them."""
        for c in output.finetune:
            seq = self._sequence(c.job_id, c.index)
            if seq is not None and c.offset <= seq.num_tokens:
                if seq.num_restarts != c.num_restarts or seq.num_computed > c.offset:
                    seq.num_restarts = c.num_restarts
                    seq.num_computed = c.offset
                if not c.forward_only and seq.store_start is None:
                    seq.store_start = c.store_row - c.offset
                    self.store.allocate_at(seq.store_start, seq.num_tokens)

    def pop_trained(self) -> list[TrainingSequence]:
        """Remove and return the training sequences whose backward (or, forward-only, forward) is
        complete, in the order they were added."""
        done = [s for s in self.training if s.phase is TrainingPhase.DONE]
        for s in done:
            self.training.remove(s)
        return done

    def stop_reason(self, req: Request) -> FinishReason | None:
        """The token-level stop condition the request's last token meets, if any."""
        _, min_tokens, stop_ids, max_out = self._stops[req.request_id]
        k = len(req.output_token_ids)
        if k >= min_tokens and req.output_token_ids[-1] in stop_ids:
            return FinishReason.STOP
        if k >= max_out:
            return FinishReason.LENGTH
        return None
