"""The Pallas ragged paged attention kernel (interpret mode on CPU) against the pure-JAX reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.kernels.ragged_paged_attention import ragged_paged_attention
from coserve_jax.kernels.reference import ragged_paged_attention_ref, write_kv

# (tokens already cached, query tokens this step) per sequence; lengths end mid-page on purpose.
CASES = {
    "decode": [(40, 1), (17, 1), (64, 1), (0, 1)],
    "prefill": [(0, 23), (0, 32), (0, 5), (0, 1)],
    "mixed": [(33, 1), (0, 19), (16, 7), (50, 1), (3, 30)],
}


def _batch(rng, seqs, page_size, hq, hkv, d, num_layers, layer, num_pages=48, seq_slots=8, pad=5):
    """Random caches with the sequences' pages scattered over the pool, and a padded query batch."""
    max_pages = 6
    perm = rng.permutation(np.arange(1, num_pages))  # page 0 is the scratch page
    page_table = np.zeros((seq_slots, max_pages), np.int32)
    k_cache = rng.standard_normal((num_layers, num_pages, page_size, hkv, d)).astype(np.float32)
    v_cache = rng.standard_normal((num_layers, num_pages, page_size, hkv, d)).astype(np.float32)
    q_rows, kv_lens, used = [], [], 0
    for s, (cached, n) in enumerate(seqs):
        total = cached + n
        need = -(-total // page_size)
        page_table[s, :need] = perm[used : used + need]
        used += need
        q_rows.append(rng.standard_normal((n, hq, d)).astype(np.float32))
        kv_lens.append(total)
    q_lens = [n for _, n in seqs]
    n_tok = sum(q_lens)
    q = np.concatenate(q_rows + [rng.standard_normal((pad, hq, d)).astype(np.float32)])  # padding slots hold junk
    cu = np.full(seq_slots + 1, n_tok, np.int32)
    cu[0] = 0
    cu[1 : len(seqs) + 1] = np.cumsum(q_lens)
    kvl = np.zeros(seq_slots, np.int32)
    kvl[: len(seqs)] = kv_lens
    return q, k_cache, v_cache, kvl, page_table, cu, n_tok


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(page_size, gqa, case):
    rng = np.random.default_rng(page_size + 10 * gqa)
    seqs = CASES[case]
    hkv, d, layers, layer = 2, 16, 2, 1
    q, kc, vc, kvl, pt, cu, n_tok = _batch(rng, seqs, page_size, hkv * gqa, hkv, d, layers, layer)
    args = [jnp.asarray(a) for a in (kvl, pt, cu)] + [jnp.int32(len(seqs))]
    out = np.asarray(
        ragged_paged_attention(
            jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.int32(layer), *args, scale=d**-0.5, interpret=True
        )
    )
    ref = np.asarray(
        ragged_paged_attention_ref(jnp.asarray(q), jnp.asarray(kc[layer]), jnp.asarray(vc[layer]), *args, d**-0.5)
    )
    np.testing.assert_allclose(out[:n_tok], ref[:n_tok], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out[n_tok:], 0.0)  # padding slots


@pytest.mark.parametrize("block_q", [1, 4, 16])
def test_block_sizes_and_nonpower_of_two_group(block_q):
    """Query blocks that split a chunk at any point, and G = 5 (Qwen2.5-14B's 40:8) padded to 8."""
    rng = np.random.default_rng(block_q)
    seqs = [(9, 13), (0, 1), (31, 1), (2, 17)]
    hkv, gqa, d = 2, 5, 16
    q, kc, vc, kvl, pt, cu, n_tok = _batch(rng, seqs, 16, hkv * gqa, hkv, d, 1, 0)
    args = [jnp.asarray(a) for a in (kvl, pt, cu)] + [jnp.int32(len(seqs))]
    out = np.asarray(
        ragged_paged_attention(
            jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.int32(0), *args, scale=0.3, block_q=block_q,
            interpret=True,
        )
    )
    ref = np.asarray(ragged_paged_attention_ref(jnp.asarray(q), jnp.asarray(kc[0]), jnp.asarray(vc[0]), *args, 0.3))
    np.testing.assert_allclose(out[:n_tok], ref[:n_tok], rtol=2e-5, atol=2e-5)


def test_bf16_and_new_kv_written():
    """bf16 inputs; the step's new K/V go through write_kv into the all-layer cache first."""
    rng = np.random.default_rng(7)
    page_size, hkv, hq, d = 16, 2, 8, 32
    seqs = [(20, 1), (0, 12)]
    q, kc, vc, kvl, pt, cu, n_tok = _batch(rng, seqs, page_size, hq, hkv, d, 2, 0)
    k_new = rng.standard_normal((n_tok, hkv, d)).astype(np.float32)
    v_new = rng.standard_normal((n_tok, hkv, d)).astype(np.float32)
    slots = []
    for s, (cached, n) in enumerate(seqs):
        pos = np.arange(cached, cached + n)
        slots.append(pt[s, pos // page_size] * page_size + pos % page_size)
    slots = jnp.asarray(np.concatenate(slots).astype(np.int32))
    kc0, vc0 = write_kv(jnp.asarray(kc[0]), jnp.asarray(vc[0]), jnp.asarray(k_new), jnp.asarray(v_new), slots)
    np.testing.assert_array_equal(np.asarray(kc0).reshape(-1, hkv, d)[np.asarray(slots)], k_new)
    kc = jnp.asarray(kc).at[0].set(kc0).astype(jnp.bfloat16)
    vc = jnp.asarray(vc).at[0].set(vc0).astype(jnp.bfloat16)
    args = [jnp.asarray(a) for a in (kvl, pt, cu)] + [jnp.int32(len(seqs))]
    qb = jnp.asarray(q).astype(jnp.bfloat16)
    out = ragged_paged_attention(qb, kc, vc, jnp.int32(0), *args, scale=d**-0.5, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = ragged_paged_attention_ref(qb.astype(jnp.float32), kc[0].astype(jnp.float32), vc[0].astype(jnp.float32), *args, d**-0.5)
    np.testing.assert_allclose(np.asarray(out[:n_tok], np.float32), np.asarray(ref[:n_tok]), atol=3e-2, rtol=3e-2)


def test_pallas_kernel_in_the_step(hf_checkpoint):
    """The whole engine with the Pallas kernel (interpreted on CPU) generates what transformers does."""
    path, hf = hf_checkpoint("llama32")
    from coserve_jax import Engine, SamplingParams
    from tests.conftest import random_sequences
    from tests.test_engine import ENGINE_KW, hf_greedy

    kw = {**ENGINE_KW, "token_buckets": (32,), "seq_buckets": (8,), "max_num_batched_tokens": 32, "max_num_seqs": 8,
          "max_finetune_jobs": 0}  # generation only
    engine = Engine(path, **kw, attention_impl="pallas_interpret")
    prompts = random_sequences([1, 17, 40, 70, 5, 33], hf.config.vocab_size, seed=9)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 6)
