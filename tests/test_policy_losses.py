"""Tinker's token losses (cross_entropy, importance_sampling, ppo): values by their definitions,
and the reduction to the loss head's weighted cross-entropy checked against jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, TINY

from coserve_jax.finetune.policy_losses import LOSS_FNS, LossConfig, check_inputs, elementwise_loss, gradient_weights
from coserve_jax.finetune.token_level import base_weights, head_backward, token_losses
from coserve_jax.models import ModelConfig, init_random


def inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "target_tokens": rng.integers(0, 256, n),
        "weights": rng.choice([0.0, 1.0, 0.5], n),
        "logprobs": -rng.uniform(0.05, 4.0, n),  # the sampler's
        "advantages": rng.normal(0, 1, n),
    }


def test_values_follow_the_definitions():
    lp = np.array([-1.0, -0.5, -2.0, -0.1])
    q = np.array([-1.0, -1.0, -1.0, -0.1])  # ratios 1, e^0.5 = 1.65, e^-1 = 0.37, 1
    adv = np.array([1.0, 1.0, -1.0, -2.0])
    x = {"target_tokens": [1, 2, 3, 4], "logprobs": q, "advantages": adv, "weights": [1, 0, 2, 1]}
    r = np.exp(lp - q)
    np.testing.assert_allclose(elementwise_loss("cross_entropy", lp, x), -np.array([1, 0, 2, 1]) * lp, rtol=1e-6)
    np.testing.assert_allclose(elementwise_loss("importance_sampling", lp, x), -r * adv, rtol=1e-6)
    # PPO: ratio 1.65 with A > 0 is capped at 1.2; ratio 0.37 with A < 0 is raised to 0.8 (the min of -0.37 and -0.8)
    want = -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv)
    np.testing.assert_allclose(elementwise_loss("ppo", lp, x), want, rtol=1e-6)
    assert np.isclose(want[1], -1.2) and np.isclose(want[2], 0.8)
    np.testing.assert_allclose(elementwise_loss("ppo", lp, x, LossConfig(0.3, 2.0)), -r * adv, rtol=1e-6)  # every ratio inside: no clipping


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_gradient_weights_are_minus_the_loss_derivative(loss_fn):
    x = inputs(400, seed=3)
    rng = np.random.default_rng(4)
    lp = jnp.asarray(x["logprobs"] + rng.normal(0, 0.3, 400), jnp.float32)  # the learner drifted from the sampler
    want = -jax.grad(lambda p: jnp.sum(elementwise_loss(loss_fn, p, x)))(lp)
    got = gradient_weights(loss_fn, lp, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    if loss_fn == "ppo":  # some tokens are clipped out (coefficient 0), some not
        assert np.sum(np.asarray(got) == 0) > 20 and np.sum(np.asarray(got) != 0) > 200


@pytest.mark.parametrize("loss_fn", LOSS_FNS)
def test_the_loss_heads_weighted_cross_entropy_has_the_losses_gradient(loss_fn):
    """d(sum loss_t)/d(final hidden) by jax.grad through the model's logprobs equals the loss
    head's backward with the coefficients as weights."""
    config = ModelConfig.from_hf_dict({**TINY, **FAMILIES["llama31"], "torch_dtype": "float32"})
    base = base_weights(init_random(config, seed=0, dtype="float32"))
    n = 60
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(0, 1, (n, config.hidden_size)), jnp.float32)
    x = inputs(n, seed=8)
    targets = jnp.asarray(x["target_tokens"] % config.vocab_size, jnp.int32)
    logprobs = -token_losses(config, base, h, targets)
    x["logprobs"] = np.asarray(logprobs) + rng.normal(0, 0.3, n)  # a sampler near the learner

    want = jax.grad(lambda hh: jnp.sum(elementwise_loss(loss_fn, -token_losses(config, base, hh, targets), x)))(h)
    c = gradient_weights(loss_fn, logprobs, x)
    _, got = head_backward(config, base, h, targets, c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(want))) > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="loss_fn must be one of"):
        check_inputs("dpo", {})
    with pytest.raises(ValueError, match="missing \\['advantages'\\]"):
        check_inputs("ppo", {"target_tokens": [1], "logprobs": [0.0]})
    with pytest.raises(ValueError, match="one entry per position"):
        check_inputs("cross_entropy", {"target_tokens": [1, 2], "weights": [1.0]})
    check_inputs("importance_sampling", inputs(5))
    with pytest.raises(ValueError, match="clip thresholds"):
        LossConfig(1.2, 0.8)
