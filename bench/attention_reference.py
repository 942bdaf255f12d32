"""The CPU reference attention: per-token key gather (the earlier formulation, kept for
decode-like shapes ``T <= 2 S``) against the grouped matmul (``jax.lax.ragged_dot``) that
``coserve_jax/kernels/reference.py`` uses for the other shapes, at SmolLM2-135M's
heads (9 query / 3 KV heads of 64), one layer, fp32, interleaved A, B, A, B on one machine.

    python bench/attention_reference.py --out bench/results/attention_reference_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

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
    if args.out:
        meta = {"command": "python bench/attention_reference.py --out " + args.out, "jax": jax.__version__,
                "device": jax.devices()[0].device_kind, "platform": platform.platform()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
