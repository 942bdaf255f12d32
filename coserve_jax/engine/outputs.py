"""What the engine returns for a request: tokens, text, logprobs, timings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestOutput:
    """The state of one request's generation (a snapshot; the streaming form fills the deltas).

    Attributes:
        request_id: the engine's id of the request.
        index: position of the prompt in the ``generate`` / ``stream`` call (0 otherwise).
        prompt: the prompt text, when given as text.
        prompt_token_ids: the prompt's token ids.
        token_ids: generated token ids so far (EOS or the stop token id included when it ended
            generation, as in ``transformers`` and vLLM).
        text: generated text so far (special tokens skipped by default, cut at a stop string).
        finished: whether generation ended.
        finish_reason: ``"stop"``, ``"length"``, ``"abort"`` or ``None`` while running.
        logprobs: log-probability of each generated token (``SamplingParams.logprobs`` set), else ``None``.
        top_logprobs: per generated token, ``{token_id: logprob}`` of the ``logprobs`` most likely
            tokens (``SamplingParams.logprobs > 0``), else ``None``.
        delta_token_ids, delta_text: what this update added (streaming).
        adapter: the adapter name, or ``None`` for the base model.
        num_preemptions: times the request was preempted and recomputed.
        arrival_time, first_token_time, finish_time: ``time.monotonic()`` seconds.
    """

    request_id: str
    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_text: str = ""
    adapter: str | None = None
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token, ms."""
        return None if self.first_token_time is None else 1e3 * (self.first_token_time - self.arrival_time)

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first, ms (``None`` until finished with >= 2 tokens)."""
        if self.finish_time is None or self.first_token_time is None or len(self.token_ids) < 2:
            return None
        return 1e3 * (self.finish_time - self.first_token_time) / (len(self.token_ids) - 1)

    @property
    def e2e_ms(self) -> float | None:
        """End-to-end latency, ms."""
        return None if self.finish_time is None else 1e3 * (self.finish_time - self.arrival_time)
