"""The pure-JAX ragged paged attention reference against dense attention over whole sequences."""

import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.kernels.reference import ragged_paged_attention_ref, write_kv
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.sched.kv_cache import KVCacheManager

CASES = {
    "decode": [(40, 1), (17, 1), (64, 1)],  # (tokens already cached, query tokens this step)
    "prefill": [(0, 23), (0, 32), (0, 5)],
    "mixed": [(33, 1), (0, 19), (16, 7), (50, 1), (3, 30)],
}


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_dense(page_size, gqa, case):
    rng = np.random.default_rng(page_size * 100 + gqa)
    seqs = CASES[case]
    hkv, d = 2, 16
    hq = hkv * gqa
    kv = KVCacheManager(num_pages=64, page_size=page_size)
    max_pages = 6
    page_table = np.zeros((8, max_pages), np.int32)  # 8 sequence slots, some unused
    full = []  # (q, k, v) of every whole sequence
    slot_rows, q_rows, k_rows, v_rows, expected = [], [], [], [], []
    for s, (cached, n) in enumerate(seqs):
        total = cached + n
        q, k, v = (rng.standard_normal((total, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
        full.append((q, k, v))
        table = kv.admit(s, total)
        page_table[s, : len(table)] = table
        pos = np.arange(total)
        slots = np.asarray(table)[pos // page_size] * page_size + pos % page_size
        slot_rows.append(slots)
        k_rows.append(k)
        v_rows.append(v)
        q_rows.append(q[cached:])
        seg = np.zeros(total, np.int32)
        dense = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), packed_causal_mask(seg, pos), d**-0.5)
        expected.append(np.asarray(dense)[cached:])
    kv.check_invariants()
    k_pages = jnp.zeros((64, page_size, hkv, d), jnp.float32)
    v_pages = jnp.zeros_like(k_pages)
    k_pages, v_pages = write_kv(
        k_pages, v_pages, jnp.asarray(np.concatenate(k_rows)), jnp.asarray(np.concatenate(v_rows)),
        jnp.asarray(np.concatenate(slot_rows).astype(np.int32)),
    )
    q_lens = [n for _, n in seqs]
    n_tokens = sum(q_lens)
    pad = 8  # padding slots after the last sequence
    q = np.zeros((n_tokens + pad, hq, d), np.float32)
    q[:n_tokens] = np.concatenate(q_rows)
    cu = np.zeros(9, np.int32)
    cu[1 : len(seqs) + 1] = np.cumsum(q_lens)
    cu[len(seqs) + 1 :] = n_tokens
    kv_lens = np.zeros(8, np.int32)
    kv_lens[: len(seqs)] = [c + n for c, n in seqs]
    out = np.asarray(
        ragged_paged_attention_ref(
            jnp.asarray(q), k_pages, v_pages, jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu),
            jnp.int32(len(seqs)), d**-0.5,
        )
    )
    for s in range(len(seqs)):
        np.testing.assert_allclose(out[cu[s] : cu[s + 1]], expected[s], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[n_tokens:], 0.0)



@pytest.mark.parametrize("lens", [[(40, 1), (9, 1)], [(0, 300), (20, 5)], [(600, 1), (0, 7)], [(0, 700)]],
                         ids=["short-decode", "short-prefill", "long-decode", "long-prefill"])
def test_reference_gathers_only_the_live_width(lens):
    """A page table of 2048 pages (8192 tokens): a step gathers the narrowest width of
    ``page_width_buckets`` holding its longest sequence, not the whole table. Table columns past
    that width point at a page of NaNs: any gather of them would reach P @ V (NaN * 0 = NaN)."""
    from coserve_jax.kernels.reference import page_width_buckets

    page_size, max_pages, hkv, gqa, d = 4, 2048, 2, 2, 16
    widths = page_width_buckets(max_pages, page_size)
    assert widths == (128, 512, 2048)
    width = min(w for w in widths if w * page_size >= max(c + n for c, n in lens))
    rng = np.random.default_rng(len(lens))
    n_pages = 2 + sum(-(-(c + n) // page_size) for c, n in lens)
    nan_page = n_pages - 1
    k_pages = np.zeros((n_pages, page_size, hkv, d), np.float32)
    v_pages = np.zeros_like(k_pages)
    k_pages[nan_page] = v_pages[nan_page] = np.nan
    table = np.zeros((4, max_pages), np.int32)  # unused columns: the scratch page 0, as the engine does
    table[: len(lens), width:] = nan_page  # ... except past the live width
    nxt, q_rows, expected, cu, kv_lens = 1, [], [], [0], []
    for s, (cached, n) in enumerate(lens):
        total = cached + n
        q, k, v = (rng.standard_normal((total, h, d)).astype(np.float32) for h in (hkv * gqa, hkv, hkv))
        pages = list(range(nxt, nxt + -(-total // page_size)))
        nxt += len(pages)
        table[s, : len(pages)] = pages
        for i, page in enumerate(pages):
            rows = k[i * page_size: (i + 1) * page_size]
            k_pages[page, : len(rows)] = rows
            v_pages[page, : len(rows)] = v[i * page_size: (i + 1) * page_size]
        pos = np.arange(total)
        dense = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                packed_causal_mask(np.zeros(total, np.int32), pos), d**-0.5)
        expected.append(np.asarray(dense)[cached:])
        q_rows.append(q[cached:])
        cu.append(cu[-1] + n)
        kv_lens.append(total)
    n_tok = cu[-1]
    q = jnp.asarray(np.concatenate(q_rows + [np.zeros((3, hkv * gqa, d), np.float32)]))
    cu_all = np.full(5, n_tok, np.int32)
    cu_all[: len(cu)] = cu
    kv = np.zeros(4, np.int32)
    kv[: len(lens)] = kv_lens

    def run(tbl):
        return np.asarray(ragged_paged_attention_ref(
            q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(kv), jnp.asarray(tbl), jnp.asarray(cu_all),
            jnp.int32(len(lens)), d**-0.5))

    out = run(table)
    assert np.isfinite(out).all(), "a column past the live width was read"
    for s in range(len(lens)):
        np.testing.assert_allclose(out[cu[s]: cu[s + 1]], expected[s], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[n_tok:], 0.0)
    # the NaN page inside the live width is read: the check above can fail
    inside = table.copy()
    inside[0, width - 1] = nan_page
    assert not np.isfinite(run(inside)[: cu[1]]).all()
