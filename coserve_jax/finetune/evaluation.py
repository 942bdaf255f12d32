"""Validation loss in the serving steps: an :class:`Evaluation` hands out forward-only training
sequences (:class:`~coserve_jax.sched.finetune.TrainingSequence` with ``forward_only``) whose
chunks ride in the steps' finetuning slots like training forwards, and sums their losses.

The loss is the mean per-token cross-entropy (nats) over the loss-masked target tokens of all the
examples (every target weighs ``1 / total targets``, so the sum of the chunks' weighted losses is
the mean), the quantity OpenAI's fine-tuning reports as ``valid_loss`` and ``transformers.Trainer``
as ``eval_loss`` (token-weighted). It is computed with the adapter's weights at the time its
sequences run; a job runs its evaluations between optimizer steps, so one adapter version.

With ``return_logprobs`` a pass also keeps every token's target logprob, per example: the prompt
logprobs of vLLM's ``prompt_logprobs`` and of the Tinker API's ``compute_logprobs``, computed by
the same forward as training's (not by the sampling path).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import numpy as np

from coserve_jax.finetune.data import TrainingExample
from coserve_jax.sched.finetune import TrainingSequence
from coserve_jax.sched.outputs import FinetuneChunk


@dataclasses.dataclass
class EvalRecord:
    """One validation pass: ``step`` (optimizer steps done when it ran), ``loss`` (mean
    per-token cross-entropy, nats), ``tokens`` (target tokens), ``time`` (``time.time()`` at the end)."""

    step: int
    loss: float
    tokens: int
    time: float


class Evaluation:
    """One validation pass over ``examples`` with one adapter.

    Args:
        eval_id: the id its sequences carry (a job's id, or an id of its own).
        examples: the held-out examples (each with at least one target token).
        adapter_index: adapter index in the pool (0: the base model).
        num_layers, layers_per_slice: the engine's (a sequence needs them; forward-only
            sequences run no backward).
        step: the optimizer step it evaluates (recorded).
        pack_len: consecutive examples are packed into sequences of up to this many tokens
            (attention within each example; 0: one example a sequence).
        return_logprobs: keep every token's target logprob (:attr:`logprobs`).
        on_done: called with the pass when its last sequence finished (on the engine's thread);
            the engine then ends the pass itself (without it, the caller ends it).
    Raises:
        ValueError: no examples, or no target token in them.
    """

    def __init__(self, eval_id: Hashable, examples: Sequence[TrainingExample], adapter_index: int,
                 num_layers: int, layers_per_slice: int, step: int = 0, pack_len: int = 0,
                 return_logprobs: bool = False, on_done: Callable[["Evaluation"], None] | None = None):
        self.id = eval_id
        self.examples = list(examples)
        self.num_targets = sum(e.num_targets for e in self.examples)
        if not self.examples or not self.num_targets:
            raise ValueError("an evaluation needs examples with at least one target token")
        self.adapter_index = adapter_index
        self.num_layers = num_layers
        self.layers_per_slice = layers_per_slice
        self.step = step
        self.pack_len = pack_len
        self._next = 0
        self._finished = 0
        self._chunks: dict[tuple[int, int], list] = {}  # (sequence, restarts) -> device losses
        self._losses: list = []
        self.return_logprobs = return_logprobs
        self.on_done = on_done
        self._logprobs: dict[tuple[int, int], list] = {}  # (sequence, restarts) -> (offset, ChunkLogprobs)
        self.logprobs: list[np.ndarray | None] = [None] * len(self.examples)
        """With ``return_logprobs``: per example, float32 ``[len(token_ids)]``, entry ``t`` the
        logprob of token ``t + 1`` given tokens ``0..t`` (the last entry is 0), filled as its
        sequence finishes."""

    @property
    def done(self) -> bool:
        """Every sequence finished its forward."""
        return self._finished == len(self.examples)

    def next_sequence(self) -> TrainingSequence | None:
        """The next examples (a pack of consecutive ones) as a forward-only sequence, or ``None``
        once all were handed out."""
        k = self._next
        if k >= len(self.examples):
            return None
        w = 1.0 / self.num_targets
        ids, targets, weights, segments = [], [], [], []
        while k < len(self.examples):
            ex = self.examples[k]
            n = len(ex.token_ids)
            if segments and len(ids) + n > self.pack_len:
                break
            ids += ex.token_ids
            targets += list(ex.token_ids[1:]) + [0]
            weights += [w if ex.loss_mask[t + 1] else 0.0 for t in range(n - 1)] + [0.0]
            segments.append(n)
            k += 1
        first, self._next = self._next, k
        return TrainingSequence(
            job_id=self.id, grad_row=0, adapter_index=self.adapter_index, token_ids=ids, targets=targets,
            weights=weights, dropout_rate=0.0, dropout_seed=0, num_layers=self.num_layers,
            layers_per_slice=self.layers_per_slice, index=first, forward_only=True, segments=tuple(segments),
            num_examples=len(segments), return_logprobs=self.return_logprobs,
        )

    def add_forward_loss(self, seq: TrainingSequence | FinetuneChunk, loss) -> None:
        """A chunk's weighted loss (a device scalar; not synchronised here)."""
        self._chunks.setdefault((seq.index, seq.num_restarts), []).append(loss)

    def add_logprobs(self, chunk, logprobs) -> None:
        """Record a forward chunk's target logprobs (a lazy slice of a step's output)."""
        self._logprobs.setdefault((chunk.index, chunk.num_restarts), []).append((getattr(chunk, "offset", 0), logprobs))

    def sequence_done(self, seq: TrainingSequence) -> bool:
        """A sequence finished its forward (its last attempt's chunks count). Returns :attr:`done`."""
        self._losses.extend(self._chunks.pop((seq.index, seq.num_restarts), []))
        self._chunks = {k: v for k, v in self._chunks.items() if k[0] != seq.index}
        if self.return_logprobs:
            parts = self._logprobs.pop((seq.index, seq.num_restarts), [])
            self._logprobs = {k: v for k, v in self._logprobs.items() if k[0] != seq.index}
            for i, lp in enumerate(sequence_logprobs(seq, parts)):
                self.logprobs[seq.index + i] = lp
        self._finished += seq.num_examples
        return self.done

    def record(self, now: float) -> EvalRecord:
        """The finished pass's :class:`EvalRecord` (synchronises with the device once).

        Raises:
            RuntimeError: sequences are still running.
        """
        if not self.done:
            raise RuntimeError(f"evaluation {self.id!r} has {len(self.examples) - self._finished} sequences left")
        return EvalRecord(self.step, float(sum(float(x) for x in self._losses)), self.num_targets, now)


def sequence_logprobs(seq: TrainingSequence, parts: Sequence[tuple[int, object]]) -> list[np.ndarray]:
    """A finished sequence's target logprobs per example of its pack, from its chunks' parts
    ``(offset in the pack, ChunkLogprobs)`` (anything with ``numpy() -> float32 [n]``).

    Returns:
        One float32 ``[segment length]`` array per example, in pack order (entries no chunk
        covered are 0).
    """
    full = np.zeros(seq.num_tokens, np.float32)
    for offset, lp in parts:
        values = lp.numpy()
        full[offset:offset + len(values)] = values
    return [full[start:start + seq.segments[i]] for i, start in enumerate(seq.segment_starts)]


def scoring_examples(prompts: Sequence[Sequence[int]]) -> list[TrainingExample]:
    """Prompts (token ids) as examples for a ``return_logprobs`` pass: every token after the first
    is a target. Prompts of fewer than 2 tokens have nothing to score and are left out (their
    prompt logprobs are ``[None]``, :func:`prompt_logprobs_of`).

    Returns:
        One :class:`TrainingExample` per prompt of 2+ tokens, ``line`` its position in ``prompts``.
    """
    return [TrainingExample(tuple(int(t) for t in p), (False,) + (True,) * (len(p) - 1), i)
            for i, p in enumerate(prompts) if len(p) >= 2]


def prompt_logprobs_of(prompts: Sequence[Sequence[int]], ev: Evaluation) -> list[list[float | None]]:
    """Per prompt, vLLM's and Tinker's prompt logprobs of the chosen tokens: ``[None, lp_1, ...,
    lp_{n-1}]`` (``lp_t`` = log p(token t | tokens before it), nats), from a finished
    ``return_logprobs`` pass over :func:`scoring_examples` of the same prompts.

    Raises:
        RuntimeError: the pass is not finished.
    """
    if not ev.done:
        raise RuntimeError(f"evaluation {ev.id!r} is not finished")
    by_prompt = {ex.line: lp for ex, lp in zip(ev.examples, ev.logprobs)}
    out: list[list[float | None]] = []
    for i, p in enumerate(prompts):
        lp = by_prompt.get(i)
        out.append([None] + ([] if lp is None else [float(x) for x in lp[:len(p) - 1]]))
    return out
