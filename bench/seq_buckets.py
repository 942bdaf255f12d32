"""Fewer step executables: one derived sequence bucket per token bucket against the ``T x S`` grid.

Two parts:

* ``executables``: the step buckets each shipped configuration compiles under the grid (every
  ``(T, S)`` of two power-of-two ladders, the previous default) and under the derived default
  (``S = min(T, max_num_seqs)``, :func:`coserve_jax.engine.step.make_buckets`). Configurations
  that list ``seq_buckets`` keep their grid; the count shown for them is what dropping the list
  would give.
* ``padding_flops``: what a padded sequence slot costs, in compiled FLOPs
  (``compiled.cost_analysis()``) of a Llama-3.1-8B step (bf16, abstract weights, finetuning off,
  attention as zeros since its work follows the live sequences, not the slots; the 32 layers as
  the slope of 1- and 2-layer lowerings with the scan unrolled, the rest the LM head and sampler), for a prefill-sized bucket ``T`` with ``S = 4`` and with the
  derived ``S = min(T, 128)``: the extra LM-head and sampler rows a few-sequence prefill step
  pays under the derived default.

    python bench/seq_buckets.py --out bench/results/seq_buckets_8b.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def count(max_tokens: int, max_seqs: int, token_buckets, seq_buckets) -> dict:
    from coserve_jax.engine.step import make_buckets, powers_of_two

    grid_s = seq_buckets or powers_of_two(min(4, max_seqs), max_seqs)
    return {
        "max_num_batched_tokens": max_tokens, "max_num_seqs": max_seqs,
        "grid": len(make_buckets(max_tokens, max_seqs, token_buckets, grid_s)),
        "derived": len(make_buckets(max_tokens, max_seqs, token_buckets, None)),
        "lists_seq_buckets": bool(seq_buckets),
    }


def executables() -> dict:
    from coserve_jax.serve.config import TINY_ENGINE_DEFAULTS as default  # the built-in tiny server

    rows = {}
    rows["serve (built-in tiny)"] = count(default.get("max_num_batched_tokens", 128), default.get("max_num_seqs", 16),
                                          default.get("token_buckets"), default.get("seq_buckets"))
    for path in sorted((ROOT / "configs" / "serve").glob("*.yaml")) + sorted((ROOT / "configs" / "bench").glob("*.yaml")):
        eng = (yaml.safe_load(path.read_text()) or {}).get("engine", {})
        if "max_num_batched_tokens" not in eng:
            continue
        rows[str(path.relative_to(ROOT))] = count(eng["max_num_batched_tokens"], eng.get("max_num_seqs", 256),
                                                  eng.get("token_buckets"), eng.get("seq_buckets"))
    return rows


def padding_flops(tokens_list, max_seqs: int) -> list[dict]:
    import dataclasses

    from decode_bytes import step_cost
    from coserve_jax.models import ModelConfig, init_abstract

    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json").read_text()))
    knobs = dict(max_model_len=2048, num_kv_pages=1024, attention_impl="pallas")  # (the kernel is patched to zeros)

    def whole(t, s):
        # attention as zeros (its work follows the live sequences, not the slots), the layer
        # scan unrolled at 1 and 2 layers: the slope is one layer, the rest the LM head and the
        # sampler; the step is rest + num_layers x slope
        f = {n: step_cost(init_abstract(dataclasses.replace(cfg, num_layers=n), dtype="bfloat16"), knobs, t,
                          kernel_as_zeros=True, seqs=s)["flops"] for n in (1, 2)}
        layer = f[2] - f[1]
        return f[1] - layer + cfg.num_layers * layer, f[1] - layer

    rows = []
    for t in tokens_list:
        s_derived = min(t, max_seqs)
        (tight, tight_rest), (padded, padded_rest) = whole(t, 4), whole(t, s_derived)
        rows.append({"tokens": t, "seqs_tight": 4, "seqs_derived": s_derived, "flops_tight": tight,
                     "flops_derived": padded, "head_and_sampler_tight": tight_rest,
                     "head_and_sampler_derived": padded_rest, "ratio": round(padded / tight, 5)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import jax

    result = {"command": "python bench/seq_buckets.py " + " ".join(sys.argv[1:]), "jax": jax.__version__,
              "executables": executables(), "padding_flops": padding_flops(args.tokens, args.max_num_seqs)}
    print(json.dumps(result, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
