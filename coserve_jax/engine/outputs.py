"""What the engine returns for a request: tokens, text, logprobs, timings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request (vLLM's ``CompletionOutput``): the request's own fields
    for ``n = 1``, one sequence of a parallel-sampling request otherwise.

    Attributes:
        index: which of the request's ``n`` completions (``0 .. n - 1``).
        token_ids, text, logprobs, top_logprobs, finish_reason, finished, delta_token_ids,
        delta_text: as :class:`RequestOutput`'s fields of the same names.
    """

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    finished: bool = False
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    delta_text: str = ""


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
        arrival_time, first_scheduled_time, first_token_time, finish_time: ``time.monotonic()``
            seconds (first scheduled: first admitted into a step; arrival to it is the queue time).
        completions: the ``n`` completions of a parallel-sampling request (``SamplingParams.n
            > 1``), else ``None``; read them as :attr:`outputs`. With ``n > 1`` the fields above
            describe completion 0, ``finished`` is whether all ``n`` are, the times span them
            all and ``num_preemptions`` adds theirs up.
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
    first_scheduled_time: float | None = None
    completions: list[CompletionOutput] | None = None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The request's completions (vLLM's ``RequestOutput.outputs``): ``n`` of them, or for
        ``n = 1`` one made of this output's own fields."""
        if self.completions is not None:
            return self.completions
        return [CompletionOutput(0, self.token_ids, self.text, self.logprobs, self.top_logprobs, self.finish_reason,
                                 self.finished, self.delta_token_ids, self.delta_text)]

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


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One measured step (``Engine(measure_steps=True)`` or the hybrid policy).

    Attributes:
        end_time: ``time.monotonic()`` when the step's device work finished (s).
        bucket_tokens, bucket_seqs: the compiled bucket it ran (0, 0: a backward slice alone).
        prefill_tokens: prompt tokens computed (prefill chunks, recomputation included).
        decode_tokens: decode tokens (one per running request with its prompt done).
        finetune_tokens: finetuning forward tokens.
        backward_tokens: length of the training sequence whose backward ran (0: none).
        backward_layers: the layers that backward ran.
        attention_work: ``sum_i q_i * kv_i`` over the step's sequences (see
            :class:`~coserve_jax.sched.latency_model.StepShape`).
        predicted_ms: the latency model's prediction before it learned from this step.
        measured_ms: dispatch to device completion (ms), host input building excluded.
    """

    end_time: float
    bucket_tokens: int
    bucket_seqs: int
    prefill_tokens: int
    decode_tokens: int
    finetune_tokens: int
    backward_tokens: int
    attention_work: int
    predicted_ms: float
    measured_ms: float
    backward_layers: int = 0
