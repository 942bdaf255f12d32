"""A generation request as the scheduler sees it: token ids, progress, state. Plain data."""

from __future__ import annotations

import dataclasses
import enum

from coserve_jax.sched.outputs import PENDING_TOKEN
from coserve_jax.sched.sampling_params import SamplingParams

ADAPTER_PENDING = -1
"""``Request.adapter_index`` of a request whose adapter waits for a device slot."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV pages; prefilling or decoding
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """Why a request ended (OpenAI's ``finish_reason`` values, plus ``abort``)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller


@dataclasses.dataclass(eq=False, slots=True)
class Request:
    """One generation request.

    Attributes:
        request_id: unique id (any hashable; the engine uses strings).
        prompt_token_ids: the prompt, token ids (non-empty).
        params: its :class:`SamplingParams`.
        adapter_index: LoRA adapter index of its tokens (0 = base model;
            :data:`ADAPTER_PENDING`: its adapter waits for a device slot, and the scheduler does
            not admit it until the engine places the adapter).
        lora_name: the adapter's name (``None``: the base model), vLLM's ``LoRARequest.lora_name``.
        seed: the sampling seed in use (``params.seed`` or one the engine drew).
        eos_token_ids: ids that end generation unless ``params.ignore_eos``.
        arrival_time: seconds (the engine's clock), for FCFS order and metrics.
        output_token_ids: generated tokens so far.
        num_computed_tokens: tokens whose K/V are in the cache, or are computed by a step already
            planned (the scheduler advances it when it plans a chunk; reset to 0 by preemption).
        num_pending: tokens sampled by planned steps whose values the host has not seen yet
            (one between planning a sampling chunk and its update; with overlapped steps up to two,
            and a plan then sees one).
        num_preemptions: times it lost its pages and had to be recomputed.
        ttft_slo_ms, tpot_slo_ms: the request's latency SLOs (``None``: the scheduler's
            defaults), for the hybrid policy (:mod:`coserve_jax.sched.hybrid_policy`).
        first_token_time: when its first token was sampled (seconds, the scheduler's clock).
        first_scheduled_time: when it was first admitted into a step (seconds, the same clock;
            arrival to it is the queue time).
        priority: vLLM's request priority: a lower value is served first (0 by default; any
            int). The waiting queue is in priority order, first come first served within one,
            and a waiting request that outranks running ones takes their seats and pages.
    """

    request_id: object
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_index: int = 0
    lora_name: str | None = None
    seed: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    priority: int = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens, the pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, the pending ones included."""
        return len(self.output_token_ids) + self.num_pending

    def token_id(self, i: int) -> int:
        """Token ``i`` of prompt + output."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``start:stop`` of prompt + output; a pending token is
        :data:`~coserve_jax.sched.outputs.PENDING_TOKEN`."""
        n = len(self.prompt_token_ids)
        known = n + len(self.output_token_ids)
        if stop > known:
            return self.token_ids(start, known) + [PENDING_TOKEN] * (stop - max(start, known))
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
