"""Per-request generation settings (vLLM's ``SamplingParams``), plain data validated on creation."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample and when to stop, for one request (field names and meaning as in vLLM).

    Attributes:
        n: completions to generate from the prompt (parallel sampling, vLLM's ``n``): the
            engine forks the request into ``n`` sequences that share the prompt's KV pages
            through the prefix cache; sequence ``i`` samples with ``seed + i`` when ``seed`` is
            given, else with a seed of its own; the results come back as one output's
            ``outputs`` list.
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature; ``0`` is greedy decoding.
        top_k: keep the ``top_k`` most likely tokens; ``0`` or ``-1`` keeps all.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (applied after ``top_k``); ``1.0`` keeps all.
        min_p: keep the tokens whose probability is at least ``min_p`` times the most likely
            one's (after temperature, top-k and top-p; Nguyen et al. 2024, "min-p sampling", as
            vLLM and ``transformers``' ``MinPLogitsWarper``); ``0.0`` keeps all.
        repetition_penalty: divide the positive logits, and multiply the negative ones, of every
            token in the prompt or generated so far by this (Keskar et al. 2019, CTRL, section
            4.1; ``transformers``' ``RepetitionPenaltyLogitsProcessor`` and vLLM apply it alike,
            before temperature); ``1.0`` is off, above 1 discourages repeats. Logprobs stay the
            raw model's (vLLM's default ``raw_logprobs``).
        seed: per-request seed. The same seed gives the same tokens, whatever else is in the
            batch (the key of the ``i``-th generated token is ``fold_in(key(seed), i)``). ``None``
            draws a seed from the engine's generator.
        stop: strings that end generation when they appear in the text; the text is cut before
            them (kept with ``include_stop_str_in_output``).
        stop_token_ids: token ids that end generation (kept in ``token_ids``), besides EOS.
        ignore_eos: do not stop at the model's EOS ids (benchmarks forcing output lengths).
        min_tokens: EOS and ``stop_token_ids`` are not honoured before this many tokens.
        logprobs: if set, return the log-probability (under the model's raw distribution) of
            each chosen token and of the ``logprobs`` most likely tokens at each position
            (``0``: chosen token only). At most the engine's ``max_logprobs``.
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        skip_special_tokens: leave special tokens out of the text.
    Raises:
        ValueError: a value out of range, naming the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1

    def __post_init__(self):
        # Accept a single string and any sequence for the tuple fields (a frozen dataclass, so
        # normalise through object.__setattr__).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "an integer >= -1 (0 or -1: off)", self.top_k)
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        _check(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"), "repetition_penalty",
               "a finite number > 0", self.repetition_penalty)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32), "seed", "an integer in [0, 2**32)", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "token ids >= 0", self.stop_token_ids)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens, "min_tokens", "an integer >= 0", self.min_tokens)
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs", "None or an integer >= 0", self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def _check(ok: bool, field: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} must be {expected}, got {got!r}")


def as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt: broadcast a single one (default: ``SamplingParams()``).

    Raises:
        ValueError: a list whose length is not ``n``.
    """
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
