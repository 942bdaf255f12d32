"""The CPU reference attention: per-token key gather (the earlier formulation, kept for
decode-like shapes ``T <= 2 S``) against the grouped matmul (``jax.lax.ragged_dot``) that
``coserve_jax/kernels/reference.py`` uses for the other shapes, at SmolLM2-135M's
heads (9 query / 3 KV heads of 64), one layer, fp32, interleaved A, B, A, B on one machine.

    python bench/attention_reference.py --out bench/results/attention_reference_cpu.json

It also times the live-width gather (``live_width`` rows): decode batches whose contexts are short
against a long ``max_model_len``, the reference as it is (it gathers the smallest width of
:func:`~coserve_jax.kernels.reference.page_width_buckets` holding the longest live sequence)
against the same code gathering the page table's whole width (the earlier behaviour).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.kernels import reference


def per_token_gather(*args, scale=0.125):
    qg, k_seq, v_seq, seq, mask = reference.gather_inputs(*args)
    return reference.attend_per_token(qg, k_seq, v_seq, seq, mask, scale)


def grouped(*args, scale=0.125):
    qg, k_seq, v_seq, seq, mask = reference.gather_inputs(*args)
    return reference.attend_grouped(qg, k_seq, v_seq, args[5], mask, scale)


def case(num_tokens: int, num_seqs: int, kv_width: int, page: int = 16, seed: int = 0):
    """A mixed batch: ``num_seqs - 1`` decode tokens and one prefill chunk, contexts up to ``kv_width``."""
    rng = np.random.default_rng(seed)
    max_pages = kv_width // page
    pool = num_seqs * max_pages + 1
    q_lens = [1] * (num_seqs - 1) + [num_tokens - (num_seqs - 1)]
    kv_lens = [int(rng.integers(q, kv_width + 1)) for q in q_lens]
    table = rng.permutation(np.arange(1, pool))[: num_seqs * max_pages].reshape(num_seqs, max_pages)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((num_tokens, 9, 64)).astype(np.float32)
    k = rng.standard_normal((pool, page, 3, 64)).astype(np.float32)
    v = rng.standard_normal((pool, page, 3, 64)).astype(np.float32)
    return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table, jnp.int32),
            jnp.asarray(cu), jnp.int32(num_seqs))


CASES = ((16, 8, 512), (16, 4, 512), (32, 8, 512), (64, 8, 512), (128, 8, 512), (128, 8, 1024))
"""(tokens, sequences, KV width) of the measured batches: the buckets of configs/bench/smollm2-cpu.yaml."""


LIVE_CASES = ((64, 64, 512, 8192), (64, 64, 512, 32768), (64, 64, 2048, 32768))
"""(tokens, sequences, longest live context, max_model_len) of the live-width rows (decode)."""


def live_case(num_tokens: int, num_seqs: int, live: int, max_len: int, page: int = 16, seed: int = 0):
    """Decode of ``num_seqs`` sequences with contexts up to ``live`` tokens, page table ``max_len`` wide."""
    rng = np.random.default_rng(seed)
    max_pages, used = max_len // page, -(-live // page)
    pool = num_seqs * used + 1
    kv_lens = rng.integers(1, live + 1, num_seqs)
    kv_lens[0] = live
    table = np.zeros((num_seqs, max_pages), np.int32)
    table[:, :used] = rng.permutation(np.arange(1, pool))[: num_seqs * used].reshape(num_seqs, used)
    q = rng.standard_normal((num_tokens, 9, 64)).astype(np.float32)
    k = rng.standard_normal((pool, page, 3, 64)).astype(np.float32)
    v = rng.standard_normal((pool, page, 3, 64)).astype(np.float32)
    cu = np.arange(num_seqs + 1, dtype=np.int32)
    return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table),
            jnp.asarray(cu), jnp.int32(num_seqs))


def live_width_rows(reps: int) -> list[dict]:
    """The reference at the live width against the whole page-table width, interleaved."""
    live = jax.jit(lambda *a: reference.ragged_paged_attention_ref(*a, 0.125))
    with mock.patch.object(reference, "page_width_buckets", lambda max_pages, page, factor=4: (max_pages,)):
        full = jax.jit(lambda *a: reference.ragged_paged_attention_ref(*a, 0.125))
        args_ = live_case(*LIVE_CASES[0])
        full(*args_)  # traced with the patch in place (one width: the whole table)
        for c in LIVE_CASES[1:]:
            full(*live_case(*c))
    rows = []
    for t, s, ctx, max_len in LIVE_CASES:
        args_ = live_case(t, s, ctx, max_len)
        a, b = np.asarray(full(*args_)), np.asarray(live(*args_))
        times = {"whole_width": [], "live_width": []}
        for _ in range(reps):
            for name, f in (("whole_width", full), ("live_width", live)):
                t0 = time.perf_counter()
                for _ in range(3):
                    f(*args_).block_until_ready()
                times[name].append((time.perf_counter() - t0) / 3 * 1000)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"tokens": t, "seqs": s, "live_context": ctx, "max_model_len": max_len,
                     "max_abs_diff": float(np.abs(a - b).max()), "median_ms": med,
                     "speedup": med["whole_width"] / med["live_width"]})
        print(f"decode S={s} live {ctx} of {max_len}: whole width {med['whole_width']:.2f} ms, live width "
              f"{med['live_width']:.2f} ms (x{rows[-1]['speedup']:.1f}), max |diff| {rows[-1]['max_abs_diff']:.1e}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    old = jax.jit(per_token_gather)
    new = jax.jit(grouped)
    rows = []
    for t, s, kv in CASES:
        args_ = case(t, s, kv)
        a, b = np.asarray(old(*args_)), np.asarray(new(*args_))
        err = float(np.abs(a - b).max())
        times = {"per_token_gather": [], "ragged_dot": []}
        for _ in range(args.reps):  # interleaved A, B, A, B
            for name, f in (("per_token_gather", old), ("ragged_dot", new)):
                t0 = time.perf_counter()
                for _ in range(5):
                    f(*args_).block_until_ready()
                times[name].append((time.perf_counter() - t0) / 5 * 1000)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"tokens": t, "seqs": s, "kv_width": kv, "max_abs_diff": err, "median_ms": med,
                     "speedup": med["per_token_gather"] / med["ragged_dot"]})
        print(f"T={t} S={s} KV={kv}: per-token gather {med['per_token_gather']:.2f} ms, ragged_dot {med['ragged_dot']:.2f} ms "
              f"(x{rows[-1]['speedup']:.1f}), max |diff| {err:.1e}")
    live_rows = live_width_rows(args.reps)
    if args.out:
        meta = {"command": "python bench/attention_reference.py --out " + args.out, "jax": jax.__version__,
                "device": jax.devices()[0].device_kind, "platform": platform.platform()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "live_width": live_rows}, f, indent=1)


if __name__ == "__main__":
    main()
