"""Requests in: prompts tokenized and checked, sampling seeds drawn, :class:`Request` s made
(vLLM v1's ``Processor``, which turns a prompt and its parameters into an ``EngineCoreRequest``).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

import numpy as np

from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams, as_params_list

Prompt = str | Sequence[int]


class InputProcessor:
    """Makes the scheduler's :class:`Request` s from what users pass.

    Args:
        tokenizer: tokenizes text prompts (``None``: token ids only).
        vocab_size: token ids must lie in ``[0, vocab_size)``.
        max_logprobs: most top logprobs a request may ask for.
        adapter_index: ``adapter_index(name)``: the adapter index of a request naming adapter
            ``name`` (raises ``AdapterError`` for an unknown one, or without a pool), or
            :data:`~coserve_jax.sched.request.ADAPTER_PENDING` while it waits for a device slot.
        eos_token_ids: the model's EOS ids, given to every request.
        seed: seeds the per-request seeds of requests that give none.
    """

    def __init__(self, tokenizer, vocab_size: int, max_logprobs: int, adapter_index: Callable[[str], int],
                 eos_token_ids: frozenset[int], seed: int = 0):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.adapter_index = adapter_index
        self.eos_token_ids = eos_token_ids
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    def process(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        adapter: str | None = None,
        *,
        request_id: str | None = None,
        ttft_slo_ms: float | None = None,
        tpot_slo_ms: float | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> tuple[Request, str | None]:
        """One request and its prompt text (``None`` for token ids); the arguments are
        :meth:`Engine.add_request <coserve_jax.engine.engine.Engine.add_request>`'s.

        Raises:
            ValueError: token ids outside the vocabulary, text without a tokenizer, ``logprobs``
                above ``max_logprobs``. AdapterError: unknown adapter, or no pool.
        """
        params = params or SamplingParams()
        text, ids = (prompt if isinstance(prompt, str) else None), self.token_ids(prompt)
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is above max_logprobs={self.max_logprobs}")
        adapter_index = self.adapter_index(adapter) if adapter else 0
        rid = request_id if request_id is not None else self.new_id()
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        req = Request(
            request_id=rid, prompt_token_ids=ids, params=params, adapter_index=adapter_index, lora_name=adapter or None, seed=seed,
            eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, priority=int(priority),
        )
        return req, text

    def token_ids(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids: text tokenized (special tokens added as the tokenizer does by
        default), ids checked.

        Raises:
            ValueError: text without a tokenizer, ids outside the vocabulary.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def new_id(self) -> str:
        """A fresh request id (``"req-<k>"``)."""
        return f"req-{next(self._ids)}"

    @staticmethod
    def batch(prompts, params, adapter) -> list[tuple[Prompt, SamplingParams, str | None]]:
        """``(prompt, params, adapter)`` per prompt of a batch call: one prompt or a list; one
        :class:`SamplingParams` for all or one per prompt; one adapter name for all or one per prompt.

        Raises:
            ValueError: lists of different lengths.
        """
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = as_params_list(params, len(prompts))
        adapters = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"got {len(adapters)} adapter names for {len(prompts)} prompts")
        return list(zip(prompts, plist, adapters))
