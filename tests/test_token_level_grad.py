"""Token-level finetuning gives the gradient of the whole-sequence loss (vs jax.grad)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES, TINY

from coserve_jax.finetune.reference import pack_gradient, sequence_gradient, whole_sequence_loss
from coserve_jax.finetune.token_level import base_weights
from coserve_jax.models import ModelConfig, init_random

MODULES = {"q_proj": 4, "v_proj": 4, "o_proj": 2, "gate_proj": 8, "down_proj": 4}


def setup(family="llama31", seed=0, **overrides):
    spec = {**TINY, **FAMILIES[family], "torch_dtype": "float32", **overrides}
    config = ModelConfig.from_hf_dict(spec)
    model = init_random(config, seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    L = config.num_layers
    lora, scaling = {}, {}
    for m, r in MODULES.items():
        d_in, d_out = config.module_dims(m)
        lora[m] = {"A": jnp.asarray(rng.normal(0, 0.2, (L, d_in, r)), jnp.float32),
                   "B": jnp.asarray(rng.normal(0, 0.2, (L, r, d_out)), jnp.float32)}
        scaling[m] = jnp.full((L,), 2.0 / r, jnp.float32)
    return config, base_weights(model), lora, scaling, model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("family", ["llama31", "qwen2"])
@pytest.mark.parametrize("chunk,layers_per_slice", [pytest.param(1, 1, marks=pytest.mark.slow), (7, 2), pytest.param(64, 1, marks=pytest.mark.slow)])
def test_chunked_forward_sliced_backward_equals_jax_grad(family, chunk, layers_per_slice):
    config, base, lora, scaling, model = setup(family)
    n = 150  # many chunks of every size tried, not a multiple of 7 or 64
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, n), jnp.int32)
    loss_mask = jnp.asarray(np.arange(n) >= 40)  # prompt of 40 tokens carries no loss
    normalizer = jnp.float32(loss_mask.sum() * 2)  # as if another sequence shared the step
    page_size, pages = 16, 12
    shape = (config.num_layers, pages + 1, page_size, config.num_kv_heads, config.head_dim)
    kc, vc = jnp.zeros(shape), jnp.zeros(shape)
    page_table = jnp.asarray(rng.permutation(np.arange(1, pages + 1))[None, :], jnp.int32)
    loss, grads = sequence_gradient(
        config, base, lora, scaling, tokens, loss_mask, normalizer, kc, vc, page_table,
        chunk=chunk, layers_per_slice=layers_per_slice,
    )
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(  # (jitted only for speed)
        lambda lo: whole_sequence_loss(model, lo, scaling, tokens, loss_mask, normalizer)
    ))(lora)
    assert rel(loss, ref_loss) < 1e-6
    for m in MODULES:
        for w in ("A", "B"):
            assert np.abs(np.asarray(ref_grads[m][w])).max() > 0
            assert rel(grads[m][w], ref_grads[m][w]) <= 1e-5, (m, w)


def test_prompt_mask_matters():
    """Control: the reference sees the mask (a different mask gives a different gradient)."""
    config, base, lora, scaling, model = setup()
    tokens = jnp.arange(30, dtype=jnp.int32) % config.vocab_size
    grad_fn = jax.jit(jax.grad(lambda lo, mask: whole_sequence_loss(model, lo, scaling, tokens, mask, 20.0)))  # (jitted for speed)
    g1 = grad_fn(lora, jnp.arange(30) >= 10)
    g2 = grad_fn(lora, jnp.arange(30) >= 0)
    assert rel(g1["q_proj"]["A"], g2["q_proj"]["A"]) > 1e-3


@pytest.mark.parametrize("chunk", [7, pytest.param(64, marks=pytest.mark.slow)])
def test_lora_dropout_masks_repeat_in_chunks_and_recompute(chunk):
    """With LoRA dropout the token-level gradient still equals jax.grad of the whole-sequence loss
    under the same masks, and the masks matter (a different seed changes the gradient)."""
    config, base, lora, scaling, model = setup()
    n = 90
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, n), jnp.int32)
    loss_mask = jnp.asarray(np.arange(n) >= 20)
    normalizer = jnp.float32(loss_mask.sum())
    shape = (config.num_layers, 9, 16, config.num_kv_heads, config.head_dim)
    page_table = jnp.arange(1, 9, dtype=jnp.int32)[None]
    _, grads = sequence_gradient(
        config, base, lora, scaling, tokens, loss_mask, normalizer, jnp.zeros(shape), jnp.zeros(shape), page_table,
        chunk=chunk, layers_per_slice=1, dropout_rate=0.3, dropout_seed=11,
    )
    grad_fn = jax.jit(jax.grad(  # (jitted only for speed)
        lambda lo, seed: whole_sequence_loss(model, lo, scaling, tokens, loss_mask, normalizer, 0.3, seed)
    ))
    ref = grad_fn(lora, jnp.uint32(11))
    other = grad_fn(lora, jnp.uint32(12))
    for m in MODULES:
        for w in ("A", "B"):
            assert rel(grads[m][w], ref[m][w]) <= 1e-5, (m, w)
    assert rel(other["q_proj"]["A"], ref["q_proj"]["A"]) > 1e-2


def test_dropout_rate_zero_is_identity_and_rate_is_respected():
    from coserve_jax.lora.dropout import LoRADropout

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
    pos = jnp.arange(64, dtype=jnp.int32)
    seed = jnp.full((64,), 5, jnp.uint32)
    off = LoRADropout(jnp.zeros(64), seed, pos).apply(x, jnp.int32(1), "q_proj")
    assert np.array_equal(np.asarray(off), np.asarray(x))
    on = np.asarray(LoRADropout(jnp.full(64, 0.25), seed, pos).apply(x, jnp.int32(1), "q_proj"))
    dropped = np.mean(on == 0)
    assert 0.22 < dropped < 0.28
    kept = on != 0
    assert np.allclose(on[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)


def test_packed_examples_with_any_layer_counts_equal_jax_grad_of_each_example():
    """A pack of three examples (attention within each, positions and dropout seeds of its own),
    its backward run in pieces of 3, 1 and 2 layers with the count traced, gives the sum of the
    examples' whole-sequence gradients; so does one piece of all 6 layers."""
    config, base, lora, scaling, model = setup(num_hidden_layers=6)
    rng = np.random.default_rng(3)
    segments = (23, 41, 17)
    n = sum(segments)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, n), jnp.int32)
    mask = np.ones(n, bool)
    mask[[0, 1, 2, 23, 24, 64]] = False  # a few prompt tokens
    loss_mask = jnp.asarray(mask)
    normalizer = jnp.float32(mask.sum())
    seeds = jnp.asarray([11, 12, 13], jnp.uint32)
    grad_fn = jax.jit(jax.value_and_grad(  # (jitted only for speed)
        lambda lo, t, m, seed: whole_sequence_loss(model, lo, scaling, t, m, normalizer, 0.25, seed)))
    want_loss, want = 0.0, jax.tree.map(jnp.zeros_like, lora)
    start = 0
    for k, seed in zip(segments, (11, 12, 13)):
        loss, g = grad_fn(lora, tokens[start:start + k], loss_mask[start:start + k], jnp.uint32(seed))
        want_loss += float(loss)
        want = jax.tree.map(jnp.add, want, g)
        start += k
    for counts in ([3, 1, 2], [6]):
        loss, grads = pack_gradient(config, base, lora, scaling, tokens, loss_mask, normalizer, segments=segments,
                                    layer_counts=jnp.asarray(counts, jnp.int32), dropout_rate=0.25, dropout_seeds=seeds)
        assert rel(loss, want_loss) < 1e-6
        for m in MODULES:
            for w in ("A", "B"):
                assert np.abs(np.asarray(want[m][w])).max() > 0
                assert rel(grads[m][w], want[m][w]) <= 1e-5, (counts, m, w)
