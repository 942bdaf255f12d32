"""The engine's batch, chat and streaming calls, and the waits of finetuning (vLLM's ``LLM``
over its ``LLMEngine``): loops over :meth:`Engine.step <coserve_jax.engine.engine.Engine.step>`,
written once here so the engine module holds only the step and its parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Iterator, Sequence

from coserve_jax.engine.input_processor import InputProcessor, Prompt
from coserve_jax.engine.outputs import RequestOutput
from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import FinetuneJob
from coserve_jax.sched.sampling_params import SamplingParams


class OfflineAPI:
    """``generate``, ``chat``, ``stream``, ``wait_for`` and ``evaluate`` of
    :class:`~coserve_jax.engine.engine.Engine` (a mixin: it needs the engine's ``step``,
    ``add_request``, ``abort``, ``has_unfinished``, ``tokenizer`` and ``finetuning``)."""

    def _add_all(self, prompts, params, adapter, priority=None) -> list[str]:
        ids = []
        batch = InputProcessor.batch(prompts, params, adapter)
        prios = [0] * len(batch) if priority is None else (
            list(priority) if isinstance(priority, (list, tuple)) else [priority] * len(batch))
        if len(prios) != len(batch):
            raise ValueError(f"got {len(prios)} priorities for {len(batch)} prompts")
        try:
            for i, (p, sp, a) in enumerate(batch):
                ids.append(self.add_request(p, sp, a, index=i, priority=prios[i]))
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
        *,
        use_tqdm: bool = True,
        priority: int | Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished :class:`RequestOutput` per prompt, in order.

        Args:
            prompts: one prompt or a list (text or token ids each).
            params: one :class:`SamplingParams` for all, or one per prompt.
            adapter: adapter name for all, or one per prompt (``None``: base model).
            use_tqdm: show a progress bar (prompts done, input and output tokens/s), as vLLM's
                ``LLM.generate``.
            priority: vLLM's request priority, for all prompts or one per prompt (lower is served
                first; see :meth:`add_request`).
        Raises:
            ValueError, AdapterError: as :meth:`add_request`; nothing is queued then.
        """
        ids = self._add_all(prompts, params, adapter, priority)
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        with _bar(use_tqdm, len(ids), "Processed prompts", "prompt") as bar:
            n_in = n_out = 0
            while len(done) < len(ids):
                for o in self.step():
                    if o.finished and o.request_id in wanted:
                        done[o.request_id] = o
                        n_in, n_out = n_in + len(o.prompt_token_ids), n_out + len(o.token_ids)
                        if bar is not None:
                            bar.update(1)
                            rate = bar.format_dict["elapsed"] or 1e-9
                            bar.set_postfix_str(f"input {n_in / rate:.1f} toks/s, output {n_out / rate:.1f} toks/s", refresh=False)
                if not self.has_unfinished and len(done) < len(ids):  # pragma: no cover - defensive
                    raise RuntimeError("the engine went idle with requests unfinished")
        return [done[i] for i in ids]

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations (vLLM's ``LLM.chat``): each is rendered with the
        tokenizer's chat template (:func:`coserve_jax.tokenizer.encode_chat`), then as :meth:`generate`.

        Args:
            messages: one conversation (``[{"role": ..., "content": ...}, ...]``) or a list of them.
            params, adapter: as :meth:`generate`.
            add_generation_prompt: end each prompt with the assistant header.
            chat_template_kwargs: variables for the template (e.g. ``date_string``).
        Returns:
            One finished :class:`RequestOutput` per conversation, in order.
        Raises:
            ValueError: no tokenizer, or a tokenizer without a chat template; as :meth:`generate`.
        """
        from coserve_jax.tokenizer import encode_chat

        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: chat needs one with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [encode_chat(self.tokenizer, c, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, params, adapter)

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

    def wait_for(self, *jobs: FinetuneJob, max_steps: int | None = None, use_tqdm: bool = True) -> None:
        """Step the engine until ``jobs`` (default: all active) are done or paused, or
        ``max_steps`` steps. Outputs of inference requests produced meanwhile are not returned (use :meth:`step`
        yourself to serve and train together).

        Args:
            use_tqdm: show a progress bar of the jobs' optimizer steps, with the last loss.
        """
        jobs = jobs or tuple(j for j in self.finetuning.jobs.values() if not j.done)
        n = 0
        with _bar(use_tqdm, sum(j.total_steps for j in jobs), "Optimizer steps", "step") as bar:
            shown = 0
            while any(j.running for j in jobs) and (max_steps is None or n < max_steps):
                self.step()
                n += 1
                if bar is not None and (now := sum(j.step for j in jobs)) != shown:
                    bar.update(now - shown)
                    shown = now
                    losses = [j.loss_history[-1].loss for j in jobs if j.loss_history]
                    if losses:
                        bar.set_postfix_str(f"loss {losses[-1]:.4f}", refresh=False)

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
        ev = self.finetuning.start_evaluation(data, adapter, config)
        try:
            while not ev.done:
                self.step()
        finally:
            self.finetuning.end_evaluation(ev)
        return ev.record(time.time()).loss

    def prompt_logprobs(self, prompts: Prompt | Sequence[Prompt], adapter: str | None = None) -> list[list[float | None]]:
        """Each prompt token's logprob given the tokens before it, with the base model or an
        adapter: per prompt ``[None, lp_1, ..., lp_{n-1}]`` (nats), the chosen tokens' entries of
        vLLM's ``prompt_logprobs`` and what Tinker's ``SamplingClient.compute_logprobs`` returns.
        Computed as a forward-only pass in the serving steps (the finetuning forward, float32 log
        softmax over the vocabulary); this call steps the engine until it is done, other requests
        and jobs advancing meanwhile.

        Args:
            prompts: one prompt or a list (text, tokenized as :meth:`add_request` does, or token ids).
            adapter: an adapter name, or ``None`` for the base model.
        Raises:
            FinetuneError: no finetuning in this engine. AdapterError: unknown adapter.
            ValueError: a prompt longer than ``finetune_max_seq_len``, empty, or with ids
                outside the vocabulary; text without a tokenizer.
        """
        from coserve_jax.finetune.evaluation import prompt_logprobs_of

        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.inputs.token_ids(p) for p in prompts]
        ev = self.finetuning.start_scoring(ids, adapter)
        if ev is None:
            return [[None] for _ in ids]
        try:
            while not ev.done:
                self.step()
        finally:
            self.finetuning.end_evaluation(ev)
        return prompt_logprobs_of(ids, ev)


def _bar(enabled: bool, total: int, desc: str, unit: str):
    """A ``tqdm`` bar (a context manager), or a null context yielding ``None`` when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
