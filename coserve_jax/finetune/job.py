"""A finetuning job: its data order, optimizer state, progress and checkpoints (host side),
and the handle users hold (:class:`FinetuneJob`).

The engine drives it (:meth:`coserve_jax.engine.Engine.create_finetuning_job`): it asks the job
for its next :class:`~coserve_jax.sched.finetune.TrainingSequence`, tells it each forward chunk's
loss and each sequence that finished its backward, and, when an accumulation group is complete,
has the model runner run the optimizer step on the job's master weights and optimizer state
(:meth:`FinetuneJob.record_optimizer_step` takes the result) and write the new weights into the
job's adapter slot, so inference requests naming the job's adapter get the latest optimizer
step's weights.

Data order: example ``k`` (counting across epochs) is example ``perm_e[k mod N]`` of epoch
``e = k div N``, with ``perm_e`` a shuffle seeded by ``(seed, e)``; optimizer step ``g`` uses
examples ``g * A .. (g + 1) * A - 1`` (``A = gradient_accumulation_steps``), and its loss is the
mean token cross-entropy over all their target tokens. Everything is a function of the step
count, so a job resumed from a checkpoint continues with the same examples.

Training sequences: with ``packing`` (the default), consecutive examples of one optimizer step
are packed into sequences of up to ``pack_len`` tokens (attention stays within each example, so
the gradient is the same); every sequence of the current optimizer step is handed out at once,
so several are in flight (one's forward beside another's backward); the next step's wait for its
optimizer step.

Validation: with ``eval_examples``, after every ``eval_steps``-th optimizer step and after the
last one the job hands out forward-only sequences of those examples
(:class:`~coserve_jax.finetune.evaluation.Evaluation`) before its next training sequence, so
the validation loss is that optimizer step's adapter's; the job ends after its final validation.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import random
import time
from typing import Callable, Sequence

import numpy as np

from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.finetune.config import FinetuneConfig
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.evaluation import EvalRecord, Evaluation
from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights, write_peft
from coserve_jax.parallel.rules import fetch
from coserve_jax.sched.finetune import TrainingSequence
from coserve_jax.sched.outputs import FinetuneChunk


def plan_steps(config: FinetuneConfig, num_examples: int) -> tuple[int, int]:
    """``(total_sequences, total_steps)`` of a job: ``max_steps`` optimizer steps of
    ``gradient_accumulation_steps`` sequences if set, else ``ceil(num_train_epochs * N)``
    sequences in ``ceil(sequences / gradient_accumulation_steps)`` steps (the last group may be
    smaller)."""
    acc = config.gradient_accumulation_steps
    if config.max_steps is not None:
        return config.max_steps * acc, config.max_steps
    seqs = max(1, math.ceil(config.num_train_epochs * num_examples))
    return seqs, math.ceil(seqs / acc)


def lora_weights_of(params: dict, num_layers: int, lora, base_model_name_or_path: str | None) -> LoRAWeights:
    """A trainer's master weights ``{m: {"A": [L, in, r], "B": [L, r, out]}}`` (placed on the
    devices) as host :class:`~coserve_jax.lora.peft_io.LoRAWeights` (float32) with ``lora``'s
    alpha and scaling (a :class:`~coserve_jax.finetune.config.LoRAConfig`)."""
    host = fetch(params)  # also from devices of other hosts
    modules = {}
    for m, w in host.items():
        for layer in range(num_layers):
            modules[(layer, m)] = LoRAModule(np.asarray(w["A"][layer]), np.asarray(w["B"][layer]), lora.lora_alpha)
    return LoRAWeights(modules, lora.use_rslora, base_model_name_or_path)


class JobStatus(enum.StrEnum):
    """OpenAI's fine-tuning job statuses (the subset that applies)."""

    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FinetuneError(RuntimeError):
    """A finetuning job could not be created, resumed or continued."""


@dataclasses.dataclass
class LossRecord:
    """One optimizer step's metrics: ``step`` (1-based), ``loss`` (mean token cross-entropy of
    its sequences), ``grad_norm`` (before clipping), ``learning_rate``, ``tokens`` (sequence
    tokens trained), ``time`` (``time.time()``)."""

    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int
    time: float


class FinetuneJob:
    """Handle of a finetuning job running inside an :class:`~coserve_jax.engine.Engine`.

    Read ``status``, ``step`` / ``total_steps``, ``loss_history`` (:class:`LossRecord` per
    optimizer step), ``eval_history`` (validation passes), ``tokens_per_s``, ``error``,
    ``truncated_examples``; call :meth:`cancel`, :meth:`export`, :meth:`request_evaluation`. The
    job's adapter is loaded in the engine under ``adapter_name`` from the start and stays
    loaded after the job ends (unload it with ``engine.unload_adapter``).

    Built by the engine; not constructed directly (``grad_row``: its gradient-accumulator row;
    ``pack_len``: the longest training sequence examples are packed into, 0 for no packing).
    """

    def __init__(
        self,
        *,
        job_id: str,
        adapter_name: str,
        examples: Sequence[TrainingExample],
        config: FinetuneConfig,
        grad_row: int,
        adapter_index: int,
        num_layers: int,
        layers_per_slice: int,
        params: dict,
        tx,
        checkpointer: JobCheckpointer | None,
        base_model_name_or_path: str | None,
        cancel_fn: Callable[["FinetuneJob"], None],
        pause_fn: Callable[["FinetuneJob"], None] | None = None,
        resume_fn: Callable[["FinetuneJob"], None] | None = None,
        eval_examples: Sequence[TrainingExample] | None = None,
        truncated_examples: int = 0,
        skipped_examples: int = 0,
        pack_len: int = 0,
    ):
        self.id = job_id
        self.adapter_name = adapter_name
        self.config = config
        self.examples = list(examples)
        self.grad_row = grad_row
        self.pack_len = pack_len if config.packing else 0
        self.adapter_index = adapter_index
        self.num_layers = num_layers
        self.layers_per_slice = layers_per_slice
        self.params = params
        self.opt_state = tx.init(params)
        self.checkpointer = checkpointer
        self.base_model_name_or_path = base_model_name_or_path
        self._cancel_fn = cancel_fn
        self._pause_fn, self._resume_fn = pause_fn, resume_fn
        self.total_sequences, self.total_steps = plan_steps(config, len(self.examples))
        self.status = JobStatus.RUNNING
        self.error: str | None = None
        self.step = 0
        self.loss_history: list[LossRecord] = []
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.trained_tokens = 0
        self._next_seq = 0  # the counter of the next example to hand out
        self._group_done = 0  # examples of the current optimizer step whose backward is done
        self._perms: dict[int, list[int]] = {}
        self._seq_loss: dict[tuple[int, int], list] = {}  # (seq index, restarts) -> device losses
        self._group_loss: list = []
        self._group_tokens = 0
        self._seconds = 0.0  # wall time while running
        self._resumed_from: int | None = None
        self.eval_examples = list(eval_examples) if eval_examples else []
        self.eval_history: list[EvalRecord] = []
        """One :class:`~coserve_jax.finetune.evaluation.EvalRecord` per validation pass."""
        self._evaluation: Evaluation | None = None
        self.truncated_examples = truncated_examples
        """Training records cut to the engine's ``finetune_max_seq_len`` (and kept)."""
        self.skipped_examples = skipped_examples
        """Training records left out (no target token within ``finetune_max_seq_len``)."""

    # ---- user API -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """The job ended (succeeded, failed or cancelled); a paused job is not done."""
        return self.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def running(self) -> bool:
        """The job is training (neither paused nor ended)."""
        return self.status is JobStatus.RUNNING

    @property
    def tokens_per_s(self) -> float:
        """Training tokens (forward and backward of whole sequences) per second of wall time since
        the job started (or resumed), until it ended."""
        end = self.finished_at or time.time()
        return self.trained_tokens / max(end - self.created_at, 1e-9)

    @property
    def estimated_finish(self) -> float | None:
        """When the job should end (Unix seconds), from the wall time its optimizer steps so far
        took (since it started or resumed); ``None`` before the first step and once it ended."""
        done = self.step - (self._resumed_from or 0)
        if not self.running or done < 1:
            return None
        now = time.time()
        return now + (now - self.created_at) / done * (self.total_steps - self.step)

    @property
    def resumed_from_step(self) -> int | None:
        """The checkpoint step this job resumed from, if any."""
        return self._resumed_from

    def cancel(self) -> None:
        """Stop training now. The adapter keeps the last optimizer step's weights and stays
        loaded; no checkpoint is written."""
        if not self.done:
            self._cancel_fn(self)

    def pause(self) -> None:
        """Stop handing out training sequences (OpenAI's ``jobs.pause``): the sequence in
        flight, if any, finishes and its gradients are kept for the accumulation group; the
        adapter keeps serving the last optimizer step's weights.

        Raises:
            FinetuneError: the job is not running.
        """
        if not self.running:
            raise FinetuneError(f"job {self.id} is {self.status}: only a running job can be paused")
        self._pause_fn(self)

    def resume(self) -> None:
        """Continue a paused job where it stopped (OpenAI's ``jobs.resume``).

        Raises:
            FinetuneError: the job is not paused.
        """
        if self.status is not JobStatus.PAUSED:
            raise FinetuneError(f"job {self.id} is {self.status}: only a paused job can be resumed")
        self._resume_fn(self)

    def export(self, path: str | os.PathLike) -> None:
        """Write the adapter (the last optimizer step's float32 weights) as a PEFT directory,
        atomically (:func:`coserve_jax.lora.peft_io.write_peft`)."""
        lora = self.config.lora
        training = {"lora_dropout": lora.lora_dropout,
                    "init_lora_weights": True if lora.init_lora_weights == "kaiming" else lora.init_lora_weights}
        write_peft(self.lora_weights(), path, self.num_layers, self.base_model_name_or_path, training)

    def lora_weights(self) -> LoRAWeights:
        """The adapter's current weights on the host (float32)."""
        return lora_weights_of(self.params, self.num_layers, self.config.lora, self.base_model_name_or_path)

    def __repr__(self) -> str:
        return f"FinetuneJob(id={self.id!r}, adapter={self.adapter_name!r}, status={self.status.value}, step={self.step}/{self.total_steps})"

    # ---- data ---------------------------------------------------------------------------
    def _example(self, k: int) -> TrainingExample:
        n = len(self.examples)
        epoch, i = divmod(k, n)
        if not self.config.shuffle:
            return self.examples[i]
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(n))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms = {epoch: perm}
        return self.examples[perm[i]]

    def _group(self, step: int) -> range:
        acc = self.config.gradient_accumulation_steps
        return range(step * acc, min((step + 1) * acc, self.total_sequences))

    def normalizer(self, step: int) -> int:
        """Target tokens of optimizer step ``step``'s sequences (0-based step)."""
        return sum(self._example(k).num_targets for k in self._group(step))

    def dropout_seed(self, k: int) -> int:
        return (self.config.seed * 0x9E3779B1 + k * 0x85EBCA77 + 1) & 0xFFFFFFFF

    def next_sequence(self) -> TrainingSequence | None:
        """The next sequence to run: a validation sequence while a validation pass is on, else
        the next training sequence of the current optimizer step (a pack of its next examples);
        ``None`` when the current step's sequences have all been handed out (the next step's
        wait for its optimizer step), everything has been handed out, or the job is paused."""
        if not self.running:
            return None
        if self._evaluation is not None:
            self._evaluation.adapter_index = self.adapter_index  # (set by the engine after a resume)
            return self._evaluation.next_sequence()
        k = self._next_seq
        group = self._group(self.step)
        if k >= self.total_sequences or k not in group:
            return None
        norm = self.normalizer(self.step)
        ids, targets, weights, segments, seeds = [], [], [], [], []
        while k < group.stop:
            ex = self._example(k)
            n = len(ex.token_ids)
            if segments and len(ids) + n > self.pack_len:
                break
            ids += ex.token_ids
            targets += list(ex.token_ids[1:]) + [0]
            weights += [(1.0 / norm if ex.loss_mask[t + 1] else 0.0) for t in range(n - 1)] + [0.0]
            segments.append(n)
            seeds.append(self.dropout_seed(k))
            k += 1
        first, self._next_seq = self._next_seq, k
        return TrainingSequence(
            job_id=self.id, grad_row=self.grad_row, adapter_index=self.adapter_index, token_ids=ids,
            targets=targets, weights=weights, dropout_rate=self.config.lora.lora_dropout,
            dropout_seed=seeds[0], num_layers=self.num_layers, layers_per_slice=self.layers_per_slice,
            index=first, segments=tuple(segments), dropout_seeds=tuple(seeds), num_examples=len(segments),
        )

    # ---- progress (called by the engine) --------------------------------------------------
    def add_forward_loss(self, seq: TrainingSequence | FinetuneChunk, loss) -> None:
        """Record a forward chunk's weighted loss (a device scalar; not synchronised here);
        ``seq`` is the chunk (or its sequence): its ``index``, ``num_restarts``, ``forward_only``."""
        if seq.forward_only:
            if self._evaluation is not None:
                self._evaluation.add_forward_loss(seq, loss)
            return
        self._seq_loss.setdefault((seq.index, seq.num_restarts), []).append(loss)

    @property
    def evaluating(self) -> bool:
        """A validation pass is on (its sequences come before the next training sequence)."""
        return self._evaluation is not None

    @property
    def complete(self) -> bool:
        """Every optimizer step and the final validation pass are done."""
        return self.step >= self.total_steps and self._evaluation is None

    def request_evaluation(self) -> bool:
        """Start a validation pass of the current adapter after the sequence in flight. Returns
        whether one started (``False``: no evaluation set, the job ended, or a pass is on)."""
        if self.done or not self.eval_examples or self._evaluation is not None:
            return False
        self._evaluation = Evaluation(
            self.id, self.eval_examples, self.adapter_index, self.num_layers, self.layers_per_slice, self.step, self.pack_len)
        return True

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval_steps
        return bool(self.eval_examples) and (step >= self.total_steps or bool(every and step % every == 0))

    def sequence_done(self, seq: TrainingSequence) -> bool:
        """A sequence finished its backward (or, a validation sequence, its forward). Returns
        whether its optimizer step's examples are all done (always ``False`` for validation)."""
        if seq.forward_only:
            ev = self._evaluation
            if ev is not None and ev.sequence_done(seq):
                self.eval_history.append(ev.record(time.time()))
                self._evaluation = None
            return False
        losses = self._seq_loss.pop((seq.index, seq.num_restarts), [])
        self._seq_loss = {k: v for k, v in self._seq_loss.items() if k[0] != seq.index}
        self._group_loss.extend(losses)
        self._group_tokens += seq.num_tokens
        self.trained_tokens += seq.num_tokens
        self._group_done += seq.num_examples
        return self._group_done == len(self._group(self.step))

    def record_optimizer_step(self, params: dict, opt_state, grad_norm, lr) -> None:
        """Take the result of the optimizer step the model runner ran on this job's accumulated
        gradient (:meth:`~coserve_jax.engine.model_runner.ModelRunner.optimizer_step`): the new
        master weights and optimizer state, the gradient's global norm and the learning rate
        used (device scalars). Records the step's loss, and asks for a validation pass or a
        checkpoint when one is due."""
        self.params, self.opt_state = params, opt_state
        loss = float(sum(float(x) for x in self._group_loss))
        self.step += 1
        self.loss_history.append(LossRecord(self.step, loss, float(grad_norm), float(lr), self._group_tokens, time.time()))
        self._group_loss, self._group_tokens, self._group_done = [], 0, 0
        if self._eval_due(self.step):
            self.request_evaluation()
        if self.checkpointer is not None:
            every = self.config.save_steps
            if self.step == self.total_steps or (every and self.step % every == 0):
                self.save_checkpoint()

    def finish(self, status: JobStatus, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.finished_at = time.time()

    # ---- checkpoints ----------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "job_id": self.id,
            "adapter_name": self.adapter_name,
            "step": self.step,
            "next_sequence": self.step * self.config.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "rank": self.config.lora.r,
            "target_modules": list(self.config.lora.target_modules),
            "loss_history": [dataclasses.asdict(r) for r in self.loss_history],
            "eval_history": [dataclasses.asdict(r) for r in self.eval_history],
        }

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current optimizer step (blocking, crash-safe)."""
        if self.checkpointer is None:
            raise FinetuneError(f"job {self.id!r} has no checkpoint_dir")
        self.checkpointer.save(self.step, self.params, self.opt_state, self._meta())

    def restore_latest(self) -> bool:
        """Continue from the newest complete checkpoint, if there is one. Returns whether it did.

        Raises:
            FinetuneError: the checkpoint belongs to a different adapter shape.
        """
        if self.checkpointer is None:
            return False
        step = self.checkpointer.latest_step()
        if step is None:
            return False
        try:
            params, opt_state, meta = self.checkpointer.restore(step, self.params, self.opt_state)
        except Exception as e:  # orbax raises several types for shape/structure mismatches
            raise FinetuneError(
                f"cannot resume from {self.checkpointer.directory} step {step}: {e}; use another checkpoint_dir "
                "or resume=False"
            ) from e
        if meta.get("rank") != self.config.lora.r or meta.get("target_modules") != list(self.config.lora.target_modules):
            raise FinetuneError(
                f"checkpoint {self.checkpointer.directory} step {step} is of a rank-{meta.get('rank')} adapter on "
                f"{meta.get('target_modules')}; this job trains rank {self.config.lora.r} on {list(self.config.lora.target_modules)}"
            )
        self.params, self.opt_state = params, opt_state
        self.step = int(meta["step"])
        self._next_seq = int(meta["next_sequence"])
        self.loss_history = [LossRecord(**r) for r in meta.get("loss_history", [])]
        self.eval_history = [EvalRecord(**r) for r in meta.get("eval_history", [])]
        self._resumed_from = step
        if self._eval_due(self.step) and not any(r.step == self.step for r in self.eval_history):
            self.request_evaluation()  # the crash came before this step's validation finished
        return True
