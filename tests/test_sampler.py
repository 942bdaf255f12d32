"""On-device sampling: filters against a NumPy reference, greedy, temperature, seeds, logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.engine.sampler import SamplingInputs, _filter_min_p, _filter_top_k_top_p, sample


def np_filter(row, k, p):
    """Reference: keep the top-k (k <= 0: all), then the smallest prefix with mass >= p."""
    order = np.argsort(-row, kind="stable")
    keep = np.zeros(row.shape, bool)
    kk = len(row) if k <= 0 else min(k, len(row))
    top = order[:kk]
    probs = np.exp(row[top] - row[top].max())
    probs /= probs.sum()
    cum = np.cumsum(probs) - probs
    keep[top[(cum < p) | (np.arange(kk) == 0)]] = True
    return keep


def inputs(s, temperature=0.0, top_k=0, top_p=1.0, seed=0, index=None, min_p=0.0):
    return SamplingInputs(
        jnp.full((s,), temperature, jnp.float32), jnp.full((s,), top_k, jnp.int32), jnp.full((s,), top_p, jnp.float32),
        jnp.full((s,), min_p, jnp.float32), jnp.full((s,), seed, jnp.uint32),
        jnp.arange(s, dtype=jnp.int32) if index is None else index,
        jnp.ones((s,), jnp.float32), jnp.zeros((s,), jnp.int32),  # repetition penalty off, mask row 0
    )


@pytest.mark.parametrize("k,p", [(0, 0.9), (5, 1.0), (5, 0.5), (1, 1.0), (0, 0.01), (300, 0.75)])
def test_filter_matches_numpy(k, p):
    logits = np.random.default_rng(k).standard_normal((6, 200)).astype(np.float32) * 3
    out = np.asarray(_filter_top_k_top_p(jnp.asarray(logits), jnp.full((6,), k), jnp.full((6,), p, jnp.float32)))
    for r in range(6):
        np.testing.assert_array_equal(np.isfinite(out[r]), np_filter(logits[r], k, p))


def test_greedy_and_logprobs():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    out = sample(logits, inputs(4), max_logprobs=3)
    np.testing.assert_array_equal(out.token_ids, np.argmax(np.asarray(logits), -1))
    lp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(out.logprobs, lp[np.arange(4), out.token_ids], rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids[:, 0], out.token_ids)
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-lp, axis=-1)[:, :3], rtol=1e-6)


def test_temperature_distribution():
    """Empirical frequencies of 20000 draws follow softmax(logits / T)."""
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, temp = 20000, 0.7
    out = sample(jnp.tile(logits, (n, 1)), inputs(n, temperature=temp, seed=5), max_logprobs=1)
    freq = np.bincount(np.asarray(out.token_ids), minlength=6) / n
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits / temp)), atol=0.015)


def test_top_k_top_p_sample_only_kept_tokens():
    logits = jax.random.normal(jax.random.key(1), (1, 100)) * 2
    n = 4000
    out = sample(jnp.tile(logits, (n, 1)), inputs(n, temperature=1.0, top_k=10, top_p=0.6, seed=3), max_logprobs=1)
    kept = np.flatnonzero(np_filter(np.asarray(logits[0]), 10, 0.6))
    drawn = set(np.asarray(out.token_ids).tolist())
    assert drawn <= set(kept.tolist()) and len(drawn) == len(kept)  # every kept token shows up


def test_seed_reproduces_independent_of_batch():
    """Row r's draw depends only on (seed_r, sample_index_r), not on its neighbours or position."""
    logits = jax.random.normal(jax.random.key(2), (8, 64))
    base = inputs(8, temperature=1.0, seed=11, index=jnp.zeros(8, jnp.int32))
    a = sample(logits, base, 1).token_ids
    perm = np.array([3, 1, 7, 0, 2, 6, 5, 4])
    other = base._replace(seed=jnp.where(jnp.arange(8) < 4, 99, 11).astype(jnp.uint32))  # rows 0..3: other seed
    b = sample(logits[perm], other, 1).token_ids
    # rows 4..7 of the permuted batch keep seed 11 and the same logits as rows perm[4:]
    np.testing.assert_array_equal(np.asarray(b)[4:], np.asarray(a)[perm[4:]])
    # a different seed or sample index changes draws
    c = sample(logits, base._replace(seed=base.seed + 1), 1).token_ids
    d = sample(logits, base._replace(sample_index=base.sample_index + 1), 1).token_ids
    assert (np.asarray(c) != np.asarray(a)).any() and (np.asarray(d) != np.asarray(a)).any()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_filter_matches_transformers(min_p):
    """The kept set equals transformers' MinPLogitsWarper (min_tokens_to_keep=1) on each row."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = np.random.default_rng(7).standard_normal((5, 300)).astype(np.float32) * 3
    ours = np.asarray(_filter_min_p(jnp.asarray(logits), jnp.full((5,), min_p, jnp.float32)))
    if min_p == 0.0:
        np.testing.assert_array_equal(ours, logits)
        return
    ref = MinPLogitsWarper(min_p)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


def test_min_p_samples_only_kept_tokens_per_row():
    """One batch mixes rows with and without min-p; each samples only from its kept set."""
    logits = jnp.array([[3.0, 2.5, 0.0, -1.0, -2.0]] * 2)
    n = 2000
    rows = jnp.tile(logits, (n, 1))
    mp = jnp.tile(jnp.array([0.5, 0.0], jnp.float32), n)
    params = inputs(2 * n, temperature=1.0, seed=3)._replace(min_p=mp)
    tokens = np.asarray(sample(rows, params, max_logprobs=1).token_ids).reshape(n, 2)
    # p_i >= 0.5 p_max <=> l_i >= 3 + log 0.5 = 2.31: tokens 0 and 1 only
    assert set(tokens[:, 0].tolist()) == {0, 1}
    assert set(tokens[:, 1].tolist()) >= {0, 1, 2}  # min_p off: the others are drawn too
