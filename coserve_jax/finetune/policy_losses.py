"""Token losses of the Tinker training API (``forward_backward(data, loss_fn)``), and how each
reduces to a weighted cross-entropy for the engine's loss head.

Every loss is a sum over a sequence's target tokens of a function of the model's log-probability
``p_t = log p_theta(target_t)`` (Tinker's definitions, ``loss_fn_inputs`` names):

* ``cross_entropy`` (``target_tokens``, ``weights``): ``-w_t p_t``;
* ``importance_sampling`` (``target_tokens``, ``logprobs`` q_t of the sampler, ``advantages``
  A_t): ``-r_t A_t`` with the ratio ``r_t = exp(p_t - q_t)`` (REINFORCE with an importance
  weight for the sampler/learner mismatch);
* ``ppo`` (the same inputs): ``-min(r_t A_t, clip(r_t, lo, hi) A_t)``, PPO's clipped objective
  (Schulman et al. 2017, eq. 7) applied per token, ``lo, hi`` = ``clip_low_threshold``,
  ``clip_high_threshold`` (Tinker's defaults 0.8 and 1.2).

Each depends on the parameters only through ``p_t``, so its gradient is
``sum_t -c_t dp_t/dtheta`` with the per-token coefficient ``c_t = -dloss_t/dp_t`` (``w_t``;
``r_t A_t``; ``r_t A_t`` where the unclipped term is the minimum, else 0). Since the token
cross-entropy is ``-p_t``, the gradient equals that of ``sum_t c_t CE_t`` with ``c_t`` held
constant: the loss head's weighted cross-entropy
(:func:`~coserve_jax.finetune.token_level.head_backward`) with the coefficients as weights,
computed from the same forward's log-probabilities (the adapter does not change within an
accumulation group).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo")
"""The built-in loss names, as Tinker's ``loss_fn``."""

LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
"""The ``loss_fn_inputs`` each loss needs (arrays of one entry per position)."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Tinker's ``loss_fn_config``.

    Attributes:
        clip_low_threshold, clip_high_threshold: PPO's ratio clip range ``[1 - eps_low, 1 +
            eps_high]`` (default 0.8, 1.2).
    Raises:
        ValueError: thresholds not ``0 < low <= 1 <= high``.
    """

    clip_low_threshold: float = 0.8
    clip_high_threshold: float = 1.2

    def __post_init__(self):
        if not 0 < self.clip_low_threshold <= 1 <= self.clip_high_threshold:
            raise ValueError(f"PPO clip thresholds must satisfy 0 < low <= 1 <= high, got "
                             f"{self.clip_low_threshold}, {self.clip_high_threshold}")


LOSS_CODES = {"cross_entropy": 0, "importance_sampling": 1, "ppo": 2}
"""Each loss's code in the step's per-token ``loss_code`` input (:func:`coded_coefficients`)."""


def coded_coefficients(code: jnp.ndarray, weights: jnp.ndarray, params: jnp.ndarray, logprobs: jnp.ndarray) -> jnp.ndarray:
    """The coefficients ``c_t`` of tokens of mixed losses, as the loss head computes them on the
    device (one executable for every loss: the loss is data).

    Args:
        code: int32 ``[N]``: each token's loss (:data:`LOSS_CODES`).
        weights: float32 ``[N]``: ``cross_entropy``'s weight ``w_t``, or the advantage ``A_t``
            (0 on tokens without a loss).
        params: float32 ``[N, 3]``: the sampler's logprob ``q_t`` and PPO's clip thresholds
            ``lo, hi`` (ignored by ``cross_entropy``).
        logprobs: float32 ``[N]``: the model's ``p_t``.
    Returns:
        float32 ``[N]``: ``w_t``; ``r_t A_t``; or PPO's ``r_t A_t`` where the unclipped term is
        the minimum or ``r_t`` is inside ``[lo, hi]``, else 0 (a token with ``A_t = 0`` gets 0
        even if ``r_t`` overflows).
    """
    lp = logprobs.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    q, lo, hi = params[:, 0], params[:, 1], params[:, 2]
    r = jnp.exp(lp - q)
    ra = jnp.where(w == 0, 0.0, r * w)
    unclipped_is_min = ra <= jnp.where(w == 0, 0.0, jnp.clip(r, lo, hi) * w)
    ppo = jnp.where(unclipped_is_min | ((r >= lo) & (r <= hi)), ra, 0.0)
    return jnp.where(code == 0, w, jnp.where(code == 1, ra, ppo))


def check_inputs(loss_fn: str, inputs: dict) -> None:
    """Raise ``ValueError`` naming what is wrong: an unknown loss, a missing input, or inputs of
    different lengths."""
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"loss_fn must be one of {list(LOSS_FNS)}, got {loss_fn!r}")
    missing = [k for k in LOSS_INPUTS[loss_fn] if k not in inputs]
    if missing:
        raise ValueError(f"loss_fn {loss_fn!r} needs loss_fn_inputs {list(LOSS_INPUTS[loss_fn])}; missing {missing}")
    lengths = {k: len(inputs[k]) for k in LOSS_INPUTS[loss_fn]}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"loss_fn_inputs must have one entry per position, got lengths {lengths}")


def _ratio(logprobs: jnp.ndarray, inputs: dict) -> jnp.ndarray:
    return jnp.exp(logprobs - jnp.asarray(inputs["logprobs"], jnp.float32))


def elementwise_loss(loss_fn: str, logprobs: jnp.ndarray, inputs: dict, config: LossConfig = LossConfig()) -> jnp.ndarray:
    """Each position's loss, float32 ``[N]``, from the model's ``logprobs [N]`` of the targets
    (sum it for the sequence's loss; see the module docstring)."""
    lp = jnp.asarray(logprobs, jnp.float32)
    if loss_fn == "cross_entropy":
        return -jnp.asarray(inputs["weights"], jnp.float32) * lp
    adv = jnp.asarray(inputs["advantages"], jnp.float32)
    r = _ratio(lp, inputs)
    if loss_fn == "importance_sampling":
        return -r * adv
    if loss_fn == "ppo":
        clipped = jnp.clip(r, config.clip_low_threshold, config.clip_high_threshold)
        return -jnp.minimum(r * adv, clipped * adv)
    raise ValueError(f"loss_fn must be one of {list(LOSS_FNS)}, got {loss_fn!r}")


def gradient_weights(loss_fn: str, logprobs: jnp.ndarray, inputs: dict, config: LossConfig = LossConfig()) -> jnp.ndarray:
    """The per-token coefficients ``c_t = -dloss_t/dp_t``, float32 ``[N]``: the weights with
    which the loss head's weighted cross-entropy has the loss's gradient (module docstring;
    :func:`coded_coefficients` with one loss for every token).

    Raises:
        ValueError: an unknown loss.
    """
    if loss_fn not in LOSS_CODES:
        raise ValueError(f"loss_fn must be one of {list(LOSS_FNS)}, got {loss_fn!r}")
    lp = jnp.asarray(logprobs, jnp.float32)
    n = lp.shape[0]
    w = inputs["weights"] if loss_fn == "cross_entropy" else inputs["advantages"]
    q = inputs.get("logprobs", [0.0] * n) if loss_fn != "cross_entropy" else [0.0] * n
    params = jnp.stack([jnp.asarray(q, jnp.float32), jnp.full((n,), config.clip_low_threshold, jnp.float32),
                        jnp.full((n,), config.clip_high_threshold, jnp.float32)], axis=1)
    code = jnp.full((n,), LOSS_CODES[loss_fn], jnp.int32)
    return coded_coefficients(code, jnp.asarray(w, jnp.float32), params, lp)
