"""The co-serving baselines the hybrid policy is measured against.

Both implement :class:`~coserve_jax.sched.policy.StepPolicy`, so they run in the same
scheduler and engine as :class:`~coserve_jax.sched.hybrid_policy.HybridPolicy`:

* :class:`FixedBudgetPolicy`: FlexLLM's public-code policy (its released
  scheduler): every step has the same token budget, inference first, finetuning forward tokens
  in what is left up to a fixed cap, and a backward slice every step (the scheduler's default
  size: ``layers_per_slice`` while inference runs). The budget is chosen offline and does not
  look at the SLOs.
* :class:`TemporalPolicy`: temporal sharing, the way a cluster without co-serving shares a GPU:
  ``interval_steps`` inference-only steps, then one whole finetuning iteration (the forward and
  backward of ``sequences_per_iteration`` training sequences, i.e. one optimizer step when that
  is the job's ``gradient_accumulation_steps``) with inference paused. An idle device (nothing to
  infer) trains at once, so the baseline does not waste idle time.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

from coserve_jax.sched.policy import Load, StepBudget


class FixedBudgetPolicy:
    """The same budget every step (FlexLLM's public code).

    Args:
        max_tokens: token budget of a step (inference and finetuning forward tokens).
        max_finetune_tokens: most finetuning forward tokens in a step.
    Raises:
        ValueError: a budget below 1 token or a negative finetuning cap.
    """

    def __init__(self, max_tokens: int, max_finetune_tokens: int):
        if max_tokens < 1 or max_finetune_tokens < 0:
            raise ValueError(f"need max_tokens >= 1 and max_finetune_tokens >= 0, got {max_tokens}, {max_finetune_tokens}")
        self.budget = StepBudget(max_tokens, max_finetune_tokens, True)

    def decide(self, load: Load) -> StepBudget:
        return self.budget


class TemporalPolicy:
    """Temporal sharing: ``interval_steps`` inference steps, then one finetuning iteration alone.

    Args:
        interval_steps: inference steps between two finetuning iterations (``F``).
        max_tokens: token budget of every step (inference steps and finetuning steps).
        sequences_per_iteration: training examples (forward and whole backward) in one iteration.
    Raises:
        ValueError: an interval or iteration below 1.

    The policy counts the examples trained during an iteration with the scheduler's counter
    (:attr:`Load.trained_examples`; a pack of examples counts each); a finetuning step runs whole
    backwards.
    """

    def __init__(self, interval_steps: int, max_tokens: int, sequences_per_iteration: int = 1):
        if interval_steps < 1 or sequences_per_iteration < 1 or max_tokens < 1:
            raise ValueError(
                f"interval_steps, max_tokens and sequences_per_iteration must be >= 1, got "
                f"{interval_steps}, {max_tokens}, {sequences_per_iteration}"
            )
        self.interval_steps = interval_steps
        self.max_tokens = max_tokens
        self.sequences_per_iteration = sequences_per_iteration
        self.training = False
        self.iterations = 0
        self._steps = 0  # inference steps since the last iteration
        self._trained_at_start = 0  # the scheduler's sequence counter when the iteration began

    def decide(self, load: Load) -> StepBudget:
        finetune_pending = bool(load.finetune_tokens or load.backward_tokens)
        if self.training:
            done = load.trained_examples - self._trained_at_start
            if done >= self.sequences_per_iteration or not finetune_pending:
                self.training = False
                self.iterations += 1
                self._steps = 0
        elif finetune_pending:
            inference_pending = bool(load.decoding or load.prefill_tokens)
            if self._steps >= self.interval_steps or not inference_pending:
                self.training, self._trained_at_start = True, load.trained_examples
        if self.training:
            return StepBudget(self.max_tokens, self.max_tokens, True, inference=False, backward_layers=1 << 30)
        self._steps += 1
        return StepBudget(self.max_tokens, 0, False)
