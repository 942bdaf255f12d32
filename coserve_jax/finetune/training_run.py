"""A training run of the Tinker training API: a LoRA adapter trained by its user's calls
(``forward``, ``forward_backward``, ``optim_step``) instead of by a dataset, inside the serving
steps like a finetuning job.

Tinker's model (``tinker.TrainingClient``): the user submits calls and awaits their futures
later; a run applies them in submission order. A ``forward_backward`` adds the gradient of its
loss (a sum over its data's tokens, :mod:`coserve_jax.finetune.policy_losses`) into the run's
gradient accumulator; gradients accumulate across calls until ``optim_step``, which applies
AdamW with the call's :class:`AdamParams` ("identical to ``torch.optim.AdamW``"; optax's
``adamw`` is the same update) and zeroes the accumulator. Every call before an ``optim_step``
sees the same weights, so all of their sequences are handed to the scheduler at once (up to the
service's in-flight bound) and share steps with each other, with other runs and jobs, and with
inference requests; a call after an ``optim_step`` waits for it.

Mapped onto the engine: each call's data (:class:`Datum`) become training sequences (packs of
consecutive data, one example each) whose per-token loss is data for the fused step's loss head
(``loss_code``, the advantages as weights, the sampler's logprobs, the clip range), which also
returns every token's target logprob; a ``forward`` is forward-only sequences. The run's loss
metric (``loss:sum``) and per-datum ``logprobs`` are computed from those logprobs on the host.

Host side; the engine's :class:`~coserve_jax.engine.finetune_service.FinetuneService` drives it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from typing import Callable, Sequence

import numpy as np

from coserve_jax.finetune.checkpoint import JobCheckpointer
from coserve_jax.finetune.config import LoRAConfig
from coserve_jax.finetune.evaluation import sequence_logprobs
from coserve_jax.finetune.job import lora_weights_of
from coserve_jax.finetune.policy_losses import LOSS_CODES, LOSS_FNS, LossConfig, check_inputs, elementwise_loss
from coserve_jax.lora.peft_io import LoRAWeights, write_peft
from coserve_jax.sched.finetune import TrainingSequence


class RunError(RuntimeError):
    """A call of a training run failed (its future holds it), or the run is closed."""


@dataclasses.dataclass(frozen=True)
class Datum:
    """One example of a call (Tinker's ``Datum``).

    Attributes:
        token_ids: the model input, ``N`` tokens.
        loss_fn_inputs: ``{name: sequence of N numbers}``: ``target_tokens`` (the token each
            position predicts) and the loss's inputs (``weights``; ``logprobs`` and
            ``advantages``).
    """

    token_ids: Sequence[int]
    loss_fn_inputs: dict

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class AdamParams:
    """Tinker's ``AdamParams`` (its defaults): ``learning_rate``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay`` (decoupled, as ``torch.optim.AdamW``), ``grad_clip_norm`` (the global norm
    the gradient is clipped to; 0: no clipping).

    Raises:
        ValueError: a negative rate, clip norm or weight decay, betas outside ``[0, 1)``, or a
            non-positive eps.
    """

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self):
        if self.learning_rate < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("learning_rate, weight_decay and grad_clip_norm must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@dataclasses.dataclass
class ForwardBackwardOutput:
    """What a ``forward`` or ``forward_backward`` returns (Tinker's ``ForwardBackwardOutput``).

    Attributes:
        loss_fn_outputs: per datum, ``{"logprobs": float32 [N]}``: each position's target logprob
            under the weights the call ran with.
        metrics: ``{"loss:sum": the call's loss}`` (the sum over its data's tokens).
    """

    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclasses.dataclass
class OptimStepOutput:
    """What an ``optim_step`` returns: ``metrics`` (``grad_norm``: the accumulated gradient's
    global norm before clipping; ``learning_rate``; ``step``: optimizer steps done)."""

    metrics: dict[str, float]


class RunFuture:
    """The future of one call: :meth:`result` once :attr:`done` (the engine steps meanwhile)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._done = threading.Event()
        self._result = None
        self._error: str | None = None
        self._callbacks: list[Callable[["RunFuture"], None]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> str | None:
        """Why the call failed (``None``: it did not, or is not done)."""
        return self._error

    def add_done_callback(self, fn: Callable[["RunFuture"], None]) -> None:
        """Call ``fn(self)`` when the call is done (at once if it is), in the thread that
        finishes it (the engine's)."""
        self._callbacks.append(fn)
        if self.done:
            fn(self)

    def _finish(self) -> None:
        self._done.set()
        for fn in self._callbacks:
            fn(self)

    def set_result(self, result) -> None:
        self._result = result
        self._finish()

    def set_error(self, error: str) -> None:
        self._error = error
        self._finish()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (another thread steps the engine); returns whether it is."""
        return self._done.wait(timeout)

    def result(self):
        """The call's output (:class:`ForwardBackwardOutput` or :class:`OptimStepOutput`).

        Raises:
            RunError: the call failed, or it is not done yet.
        """
        if not self.done:
            raise RunError(f"the {self.kind} call is not done yet: step the engine")
        if self._error is not None:
            raise RunError(self._error)
        return self._result


@dataclasses.dataclass(eq=False)
class _Call:
    kind: str  # "forward", "forward_backward", "optim_step" or "barrier"
    future: RunFuture
    data: list[Datum] = dataclasses.field(default_factory=list)
    loss_fn: str = "cross_entropy"
    loss_config: LossConfig = LossConfig()
    adam: AdamParams | None = None
    fn: Callable | None = None  # a barrier's action
    handed_out: int = 0  # data handed to the scheduler
    finished: int = 0  # data whose sequence is done
    logprobs: list = dataclasses.field(default_factory=list)


def set_hyperparams(opt_state, adam: AdamParams):
    """``opt_state`` (of :func:`make_run_optimizer`'s transformation) with its injected
    hyperparameters set to ``adam``'s, each placed as the value it replaces (so the compiled
    optimizer step takes it without recompiling)."""
    import jax

    clip_state, adam_state = opt_state
    clip = np.float32(adam.grad_clip_norm) if adam.grad_clip_norm > 0 else np.float32(np.inf)
    new_adam = {"learning_rate": adam.learning_rate, "b1": adam.beta1, "b2": adam.beta2, "eps": adam.eps,
                "eps_root": 0.0, "weight_decay": adam.weight_decay}

    def put(old, value):
        return jax.device_put(np.asarray(value, old.dtype), old.sharding)

    clip_state = clip_state._replace(hyperparams={"max_norm": put(clip_state.hyperparams["max_norm"], clip)})
    adam_state = adam_state._replace(hyperparams={k: put(v, new_adam[k]) for k, v in adam_state.hyperparams.items()})
    return clip_state, adam_state


def make_run_optimizer():
    """A run's optimizer: global-norm clipping then AdamW, both with their hyperparameters in
    the optimizer state (``optax.inject_hyperparams``), so each ``optim_step`` sets them
    (:func:`set_hyperparams`) without recompiling."""
    import optax

    defaults = AdamParams()
    return optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=float("inf")),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=defaults.learning_rate, b1=defaults.beta1, b2=defaults.beta2, eps=defaults.eps,
            weight_decay=defaults.weight_decay),
    )


class TrainingRun:
    """A Tinker training run in an engine: its adapter, gradient row, optimizer state and calls.

    Submit calls with :meth:`forward`, :meth:`forward_backward` and :meth:`optim_step` (each
    returns a :class:`RunFuture` at once; step the engine to run them), read
    :meth:`lora_weights`, :meth:`export` a PEFT directory, :meth:`close` it. The run's adapter
    is loaded in the engine under ``adapter_name`` and serves the latest optimizer step's weights.

    Built by :meth:`coserve_jax.engine.Engine.create_training_run`; not constructed directly.
    """

    def __init__(
        self, *, run_id: str, adapter_name: str, lora: LoRAConfig, seed: int, grad_row: int, adapter_index: int,
        num_layers: int, layers_per_slice: int, params: dict, tx, pack_len: int, max_seq_len: int, vocab_size: int,
        base_model_name_or_path: str | None, on_submit: Callable[["TrainingRun"], None],
        close_fn: Callable[["TrainingRun"], None],
    ):
        self.id = run_id
        self.adapter_name = adapter_name
        self.lora = lora
        self.seed = seed
        self.grad_row = grad_row
        self.adapter_index = adapter_index
        self.num_layers = num_layers
        self.layers_per_slice = layers_per_slice
        self.params = params
        self.tx = tx
        self.opt_state = tx.init(params)
        self.pack_len = pack_len
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.base_model_name_or_path = base_model_name_or_path
        self.step = 0
        """Optimizer steps done."""
        self.closed = False
        self.created_at = time.time()
        self.trained_tokens = 0
        self._on_submit, self._close_fn = on_submit, close_fn
        self._calls: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._next_index = 0
        self._sequences: dict[int, tuple[_Call, int]] = {}  # sequence index -> (call, first datum)
        self._logprobs: dict[tuple[int, int], list] = {}  # (index, restarts) -> [(offset, ChunkLogprobs)]

    def __repr__(self) -> str:
        return f"TrainingRun(id={self.id!r}, adapter={self.adapter_name!r}, rank={self.lora.r}, step={self.step})"

    # ---- calls ---------------------------------------------------------------------------
    def forward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy", loss_fn_config: dict | None = None) -> RunFuture:
        """Each datum's target logprobs and the loss, without a gradient (Tinker's ``forward``).

        Raises:
            ValueError: bad data (see :meth:`forward_backward`). RunError: the run is closed.
        """
        return self._submit("forward", data, loss_fn, loss_fn_config)

    def forward_backward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict | None = None) -> RunFuture:
        """Add the gradient of ``sum over data and tokens of loss_fn`` into the run's accumulator
        and return each datum's target logprobs and the loss (Tinker's ``forward_backward``).

        Args:
            data: the batch; each datum's ``loss_fn_inputs`` as :data:`~coserve_jax.finetune.policy_losses.LOSS_INPUTS`.
            loss_fn: ``cross_entropy``, ``importance_sampling`` or ``ppo``.
            loss_fn_config: PPO's ``clip_low_threshold`` / ``clip_high_threshold``.
        Raises:
            ValueError: an empty batch, an unknown loss, missing or ragged inputs, an empty or
                too long datum (over ``finetune_max_seq_len``), token ids outside the vocabulary.
                Nothing is queued.
            RunError: the run is closed.
        """
        return self._submit("forward_backward", data, loss_fn, loss_fn_config)

    def optim_step(self, adam_params: AdamParams | None = None) -> RunFuture:
        """Apply AdamW to the gradient accumulated since the last optimizer step, after every
        call submitted before it, and zero the accumulator (Tinker's ``optim_step``).

        Raises:
            RunError: the run is closed.
        """
        if self.closed:
            raise RunError(f"training run {self.id} is closed")
        call = _Call("optim_step", RunFuture("optim_step"), adam=adam_params or AdamParams())
        with self._lock:
            self._calls.append(call)
        self._on_submit(self)
        return call.future

    def after_previous(self, fn: Callable[["TrainingRun"], object]) -> RunFuture:
        """Run ``fn(run)`` in the engine's thread once every call submitted before is done and
        before any submitted after it runs (a save of the weights between two calls); its return
        value is the future's result, its exception the future's error.

        Raises:
            RunError: the run is closed.
        """
        if self.closed:
            raise RunError(f"training run {self.id} is closed")
        call = _Call("barrier", RunFuture("barrier"), fn=fn)
        with self._lock:
            self._calls.append(call)
        self._on_submit(self)
        return call.future

    def _submit(self, kind: str, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict | None) -> RunFuture:
        if self.closed:
            raise RunError(f"training run {self.id} is closed")
        data = [d if isinstance(d, Datum) else Datum(**d) for d in data]
        if not data:
            raise ValueError("a call needs at least one datum")
        cfg = LossConfig(**(loss_fn_config or {}))
        if loss_fn not in LOSS_FNS:
            raise ValueError(f"loss_fn must be one of {list(LOSS_FNS)}, got {loss_fn!r}")
        for i, d in enumerate(data):
            try:
                check_inputs(loss_fn, d.loss_fn_inputs)
            except ValueError as e:
                raise ValueError(f"datum {i}: {e}") from None
            n = d.num_tokens
            if not 1 <= n <= self.max_seq_len:
                raise ValueError(f"datum {i} has {n} tokens: it needs 1 to {self.max_seq_len} (finetune_max_seq_len)")
            if len(d.loss_fn_inputs["target_tokens"]) != n:
                raise ValueError(f"datum {i}: target_tokens has {len(d.loss_fn_inputs['target_tokens'])} entries "
                                 f"for {n} input tokens")
            for name in ("model_input", "target_tokens"):
                ids = np.asarray(d.token_ids if name == "model_input" else d.loss_fn_inputs[name])
                if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                    raise ValueError(f"datum {i}: {name} holds token ids outside the vocabulary (0..{self.vocab_size - 1})")
        call = _Call(kind, RunFuture(kind), data, loss_fn, cfg, logprobs=[None] * len(data))
        with self._lock:
            self._calls.append(call)
        self._on_submit(self)
        return call.future

    # ---- driven by the engine --------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Calls are queued or running."""
        return bool(self._calls)

    @property
    def optimizer_step_due(self) -> bool:
        """The oldest unfinished call is an ``optim_step`` (every call before it is done)."""
        return bool(self._calls) and self._calls[0].kind == "optim_step"

    def run_due_barriers(self) -> None:
        """Run the :meth:`after_previous` actions whose earlier calls are all done."""
        while self._calls and self._calls[0].kind == "barrier":
            with self._lock:
                call = self._calls.popleft()
            try:
                result = call.fn(self)
            except Exception as e:
                call.future.set_error(f"{type(e).__name__}: {e}")
            else:
                call.future.set_result(result)
            self._pop_finished()

    def next_sequence(self) -> TrainingSequence | None:
        """The next pack of data to run: consecutive data of the oldest call with data not yet
        handed out, before the first queued ``optim_step`` or barrier; ``None`` if there is none."""
        with self._lock:
            for call in self._calls:
                if call.kind in ("optim_step", "barrier"):
                    return None
                if call.handed_out < len(call.data):
                    return self._pack(call)
        return None

    def _pack(self, call: _Call) -> TrainingSequence:
        first = call.handed_out
        ids, targets, weights, q, segments = [], [], [], [], []
        policy = call.loss_fn != "cross_entropy"
        for d in call.data[first:]:
            n = d.num_tokens
            if segments and len(ids) + n > self.pack_len:
                break
            x = d.loss_fn_inputs
            ids += [int(t) for t in d.token_ids]
            targets += [int(t) for t in x["target_tokens"]]
            weights += [float(w) for w in (x["advantages"] if policy else x["weights"])]
            if policy:
                q += [float(v) for v in x["logprobs"]]
            segments.append(n)
        call.handed_out += len(segments)
        index = self._next_index
        self._next_index += 1
        self._sequences[index] = (call, first)
        cfg = call.loss_config
        return TrainingSequence(
            job_id=self.id, grad_row=self.grad_row, adapter_index=self.adapter_index, token_ids=ids, targets=targets,
            weights=weights, dropout_rate=0.0, dropout_seed=0, num_layers=self.num_layers,
            layers_per_slice=self.layers_per_slice, index=index, forward_only=call.kind == "forward",
            segments=tuple(segments), num_examples=len(segments), loss_code=LOSS_CODES[call.loss_fn],
            sampler_logprobs=q if policy else None, clip=(cfg.clip_low_threshold, cfg.clip_high_threshold),
            return_logprobs=True,
        )

    def add_forward_loss(self, chunk, loss) -> None:
        """(The loss is computed from the logprobs when the call is done.)"""

    def add_logprobs(self, chunk, logprobs) -> None:
        """Record a forward chunk's target logprobs (a lazy slice of a step's output)."""
        key = (chunk.index, chunk.num_restarts)
        self._logprobs.setdefault(key, []).append((getattr(chunk, "offset", 0), logprobs))

    def sequence_done(self, seq: TrainingSequence) -> None:
        """A sequence finished (its backward, or a forward's last chunk): give its data their
        logprobs and finish its call when all of its data are done."""
        parts = self._logprobs.pop((seq.index, seq.num_restarts), [])
        self._logprobs = {k: v for k, v in self._logprobs.items() if k[0] != seq.index}
        call, first = self._sequences.pop(seq.index)
        for i, lp in enumerate(sequence_logprobs(seq, parts)):
            call.logprobs[first + i] = lp
        call.finished += len(seq.segments)
        if not seq.forward_only:
            self.trained_tokens += seq.num_tokens
        if call.finished == len(call.data):
            self._finish(call)

    def _finish(self, call: _Call) -> None:
        loss = 0.0
        outputs = []
        for d, lp in zip(call.data, call.logprobs):
            loss += float(np.sum(np.asarray(elementwise_loss(call.loss_fn, lp, d.loss_fn_inputs, call.loss_config))))
            outputs.append({"logprobs": lp})
        call.future.set_result(ForwardBackwardOutput(outputs, {"loss:sum": loss}))
        self._pop_finished()

    def _pop_finished(self) -> None:
        with self._lock:
            while self._calls and self._calls[0].kind in ("forward", "forward_backward") and self._calls[0].future.done:
                self._calls.popleft()

    def prepare_optimizer_step(self) -> None:
        """Set the optimizer state's hyperparameters to the due ``optim_step``'s."""
        self.opt_state = set_hyperparams(self.opt_state, self._calls[0].adam)

    def record_optimizer_step(self, params: dict, opt_state, grad_norm, lr) -> None:
        """Take the optimizer step's result (as :meth:`FinetuneJob.record_optimizer_step`) and
        finish the due ``optim_step`` call."""
        self.params, self.opt_state = params, opt_state
        self.step += 1
        with self._lock:
            call = self._calls.popleft()
        call.future.set_result(OptimStepOutput({
            "grad_norm": float(grad_norm), "learning_rate": call.adam.learning_rate, "step": float(self.step)}))
        self._pop_finished()

    def fail_pending(self, error: str) -> None:
        """Fail every queued or running call (the run closed or an optimizer step failed)."""
        with self._lock:
            calls, self._calls = list(self._calls), deque()
        for call in calls:
            if not call.future.done:
                call.future.set_error(error)
        self._sequences.clear()
        self._logprobs.clear()

    # ---- weights -----------------------------------------------------------------------------
    def lora_weights(self) -> LoRAWeights:
        """The adapter's current weights on the host (float32)."""
        return lora_weights_of(self.params, self.num_layers, self.lora, self.base_model_name_or_path)

    def export(self, path) -> None:
        """Write the adapter (the last optimizer step's float32 weights) as a PEFT directory,
        atomically (:func:`coserve_jax.lora.peft_io.write_peft`)."""
        write_peft(self.lora_weights(), path, self.num_layers, self.base_model_name_or_path,
                   {"lora_dropout": 0.0, "init_lora_weights": True})

    def save_state(self, directory) -> None:
        """Write the run's float32 master weights, optimizer state and step as an orbax
        checkpoint under ``directory`` (crash-safe: :class:`~coserve_jax.finetune.checkpoint.JobCheckpointer`);
        Tinker's ``save_state``. Call it between calls (:meth:`after_previous`)."""
        ckpt = JobCheckpointer(directory, max_to_keep=1)
        try:
            ckpt.save(self.step, self.params, self.opt_state, {
                "step": self.step, "rank": self.lora.r, "lora_alpha": self.lora.lora_alpha,
                "target_modules": list(self.lora.target_modules)})
        finally:
            ckpt.close()

    def read_state(self, directory, optimizer: bool) -> None:
        """Take the weights (and, with ``optimizer``, the optimizer state and step) of a
        :meth:`save_state` checkpoint; Tinker's ``load_state``. The caller writes the new
        weights into the adapter slot.

        Raises:
            RunError: no checkpoint there, or one of a different rank, alpha or modules.
        """
        ckpt = JobCheckpointer(directory, max_to_keep=1)
        try:
            step = ckpt.latest_step()
            if step is None:
                raise RunError(f"no saved state in {directory}")
            params, opt_state, meta = ckpt.restore(step, self.params, self.opt_state)
        finally:
            ckpt.close()
        if meta.get("rank") != self.lora.r or meta.get("target_modules") != list(self.lora.target_modules) \
                or meta.get("lora_alpha") != self.lora.lora_alpha:
            raise RunError(f"the saved state is of a rank-{meta.get('rank')} LoRA on {meta.get('target_modules')} "
                           f"(alpha {meta.get('lora_alpha')}); this run trains rank {self.lora.r} on "
                           f"{list(self.lora.target_modules)} (alpha {self.lora.lora_alpha})")
        self.params = params
        if optimizer:
            self.opt_state, self.step = opt_state, int(meta["step"])
        else:
            self.opt_state = self.tx.init(params)

    def close(self) -> None:
        """End the run: its queued calls fail, its gradient row is freed; its adapter stays
        loaded (unload it with ``engine.unload_adapter``)."""
        if not self.closed:
            self._close_fn(self)
