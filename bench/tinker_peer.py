"""The same Tinker script against coserve-jax and against SkyRL tx (a JAX Tinker server, PyPI
``skyrl-tx``), same model, same CPU, interleaved: training and sampling tokens/s as ratios.

    python bench/tinker_peer.py --peer-python /work/skyrl-venv/bin/python \\
        --out bench/results/tinker_peer_smollm2_cpu.json

The script starts both servers on SmolLM2-135M-Instruct (the GGUF file in ``../shared/data``):
ours with ``python -m coserve_jax.serve --config configs/serve/smollm2.yaml`` (16 sequences, 4 training runs as SkyRL tx's 4 adapters) on
the GGUF; SkyRL tx with ``python -m tx.tinker.api``
from its own virtual environment (``--peer-python``: ``pip install "skyrl-tx[tinker]==0.3.0" jax
flax optax "tinker==0.16.1"``: SkyRL tx 0.3.0 speaks the JSON API of clients before
``/api/v1/client/config`` and protobuf bodies; ours is driven by the ``tinker`` client it ships
with, 0.38, which SkyRL tx cannot serve) on a safetensors copy that ``transformers`` writes from the same GGUF (SkyRL loads
safetensors only; both dequantize the same Q4_1 weights to float32). Then it runs the workload
once per round on each server, alternating which goes first (A, B, B, A, ...), each round a fresh
worker process with that side's Python and ``tinker`` client (the same script):

1. ``create_lora_training_client`` (rank 8, attention and MLP, no LM head);
2. ``--steps`` times: ``forward_backward`` of ``--batch`` GSM8K chat examples (cross-entropy on
   the answer tokens), then ``optim_step`` (AdamW, lr 1e-4): training tokens/s = input tokens /
   wall time of the steps;
3. ``save_weights_and_get_sampling_client``, then ``sample`` of ``--num-samples`` completions of
   ``--max-tokens`` tokens each for ``--prompts`` GSM8K questions, all submitted before any is
   awaited: sampling tokens/s = generated tokens / wall time.

The first round of each side is a warm-up (compilation) and is reported but left out of the
ratios. Reported: per side the min and median of each rate over the measured rounds and the
ratio ours / SkyRL tx of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GGUF = DATA / "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = DATA / "finetune" / "gsm8k" / "test.jsonl"
API_KEY = "sk-peer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/v1/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} was not ready in {timeout} s")


def export_safetensors(out: pathlib.Path) -> None:
    """The GGUF model as a transformers checkpoint (float32 safetensors, tokenizer, config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype="float32")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized float32 now
    model = AutoModelForCausalLM.from_config(config, dtype="float32")  # (a GGUF-loaded model refuses to save)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name).save_pretrained(out)
    model_cfg = json.loads((out / "config.json").read_text())  # transformers 4 (SkyRL tx pins < 5) reads rope_theta
    model_cfg.setdefault("rope_theta", (model_cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (out / "config.json").write_text(json.dumps(model_cfg, indent=1))
    cfg_file = out / "tokenizer_config.json"  # readable by transformers 4 too
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=1))


# ---- the workload (run in a worker process with either side's Python) -------------------------
def workload(base_url: str, model_dir: str, steps: int, batch: int, prompts: int, num_samples: int, max_tokens: int,
             seed: int) -> dict:
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-" + API_KEY)
    caps = service.get_server_capabilities()
    base_model = caps.supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=seed, train_unembed=False)

    def chat_prompt(question: str) -> list[int]:  # (rendered, then encoded: the same ids in transformers 4 and 5)
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def datum(row) -> tuple[types.Datum, int]:
        prompt = chat_prompt(row["question"])
        answer = tok.encode(row["answer"] + tok.eos_token, add_special_tokens=False)
        tokens = list(prompt) + list(answer)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
        return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}), len(tokens) - 1

    train_tokens, losses = 0, []
    t0 = time.perf_counter()
    for s in range(steps):
        pairs = [datum(rows[(seed * 97 + s * batch + i) % len(rows)]) for i in range(batch)]
        fb = training.forward_backward([d for d, _ in pairs], "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=1e-4))
        out = fb.result()  # the summed weighted cross-entropy, from the returned per-token logprobs
        losses.append(-sum(float(lp) * w for (d, _), o in zip(pairs, out.loss_fn_outputs)
                           for lp, w in zip(o["logprobs"].tolist(), d.loss_fn_inputs["weights"].tolist())))
        opt.result()
        train_tokens += sum(n for _, n in pairs)
    train_s = time.perf_counter() - t0
    sampler = training.save_weights_and_get_sampling_client()
    if hasattr(sampler, "result"):
        sampler = sampler.result()
    qs = [chat_prompt(rows[-1 - i]["question"]) for i in range(prompts)]
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
    t0 = time.perf_counter()
    futures = [sampler.sample(prompt=types.ModelInput.from_ints(list(q)), num_samples=num_samples,
                              sampling_params=params) for q in qs]
    generated = sum(len(seq.tokens) for f in futures for seq in f.result().sequences)
    sample_s = time.perf_counter() - t0
    return {"train_tokens": train_tokens, "train_s": train_s, "train_tokens_per_s": train_tokens / train_s,
            "losses": losses, "generated_tokens": generated, "sample_s": sample_s,
            "sample_tokens_per_s": generated / sample_s, "tinker_client": tinker.__version__}


def run_worker(python: str, url: str, model_dir: str, args, seed: int) -> dict:
    cmd = [python, __file__, "--worker", url, "--model-dir", model_dir, "--steps", str(args.steps), "--batch", str(args.batch),
           "--prompts", str(args.prompts), "--num-samples", str(args.num_samples), "--max-tokens", str(args.max_tokens),
           "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"worker against {url} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rounds: list[dict]) -> dict:
    measured = rounds[1:]
    out = {}
    for key in ("train_tokens_per_s", "sample_tokens_per_s"):
        vals = [r[key] for r in measured]
        out[key] = {"min": min(vals), "median": statistics.median(vals), "all": [r[key] for r in rounds]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--peer-python", default=str(pathlib.Path("/work/skyrl-venv/bin/python")),
                   help="the Python of a virtual environment with skyrl-tx[tinker], jax, flax and optax")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (the first is a warm-up)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(workload(args.worker, args.model_dir, args.steps, args.batch, args.prompts, args.num_samples,
                                  args.max_tokens, args.seed)))
        return
    if not GGUF.exists():
        sys.exit(f"the model is missing: {GGUF}")
    work = pathlib.Path(tempfile.mkdtemp(prefix="tinker-peer-"))
    hf_dir = work / "smollm2-hf"
    export_safetensors(hf_dir)
    ours_port, peer_port = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "coserve_jax.serve", "--config", str(ROOT / "configs" / "serve" / "smollm2.yaml"),
                "--model", str(GGUF), "--api-key", API_KEY, "--port", str(ours_port), "--output-dir", str(work / "ours"),
                "--set", "engine.max_num_seqs=16", "--set", "engine.seq_buckets=[16]", "--set", "engine.max_finetune_jobs=4"]
    peer_cmd = [args.peer_python, "-m", "tx.tinker.api", "--base-model", str(hf_dir), "--port", str(peer_port),
                "--database-url", f"sqlite:///{work / 'skyrl.db'}", "--checkpoints-base", str(work / "skyrl-ckpt"),
                "--backend-config", json.dumps({"max_lora_adapters": 4, "max_lora_rank": 8})]
    # SkyRL tx's API server starts its engine as `uv run --extra tinker --extra jax -m tx.tinker.engine ...`
    # (from a source checkout); a `uv` shim on PATH runs that module with the peer's Python instead
    shim = work / "bin" / "uv"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nshift\nwhile [ "$1" = "--extra" ]; do shift 2; done\nexec {args.peer_python} "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "TX_DATABASE_URL": f"sqlite:///{work / 'skyrl.db'}", "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    logs = {k: open(work / f"{k}.log", "w") for k in ("ours", "peer")}
    procs = {"ours": subprocess.Popen(ours_cmd, stdout=logs["ours"], stderr=subprocess.STDOUT, start_new_session=True),
             "peer": subprocess.Popen(peer_cmd, stdout=logs["peer"], stderr=subprocess.STDOUT, env=env, start_new_session=True)}
    urls = {"ours": f"http://127.0.0.1:{ours_port}", "peer": f"http://127.0.0.1:{peer_port}"}
    pythons = {"ours": sys.executable, "peer": args.peer_python}
    results: dict[str, list] = {"ours": [], "peer": []}
    try:
        for side in ("ours", "peer"):
            wait_ready(urls[side], procs[side])
        for r in range(args.rounds):
            order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
            for side in order:
                res = run_worker(pythons[side], urls[side], str(hf_dir), args, args.seed + r)
                res["round"] = r
                results[side].append(res)
                print(side, json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    finally:
        for proc in procs.values():
            with_group = os.getpgid(proc.pid) if proc.poll() is None else None
            if with_group is not None:
                os.killpg(with_group, signal.SIGINT)
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ours, peer = summary(results["ours"]), summary(results["peer"])
    report = {
        "ours": ours, "skyrl_tx": peer,
        "ratio_ours_over_skyrl_tx": {k: ours[k]["median"] / peer[k]["median"] for k in ours},
        "rounds": results, "args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "model_dir")},
        "command": "python bench/tinker_peer.py " + " ".join(sys.argv[1:]),
        "servers": {"ours": " ".join(ours_cmd[1:]), "skyrl_tx": " ".join(peer_cmd[1:])},
    }
    print(json.dumps({k: report[k] for k in ("ours", "skyrl_tx", "ratio_ours_over_skyrl_tx")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
