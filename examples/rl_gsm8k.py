"""GRPO-style RL on GSM8K with the official ``tinker`` client, against a coserve-jax server that
serves chat traffic through its OpenAI routes at the same time.

Each iteration samples ``--group-size`` answers to each of ``--batch`` GSM8K questions from the
run's latest sampler weights, rewards them (``0.5`` for ending the answer within ``--max-tokens``
tokens, ``0.5`` more when its last number is the reference answer), centres the rewards within
each question's group (GRPO's advantage, without the std division), and trains with
``forward_backward(..., "importance_sampling")`` on the sampled tokens (the sampler's logprobs as
the importance weights' denominators), ``optim_step``, ``save_weights_and_get_sampling_client``.
Meanwhile a thread sends chat requests to ``/v1/chat/completions`` at ``--chat-rate`` requests
per second and records their latency against ``--slo-ttft-ms`` / ``--slo-tpot-ms``.

Start a server on the real model with the hybrid policy, then run this against it::

    python -m coserve_jax.serve --config configs/serve/smollm2.yaml \\
        --model ../shared/data/models/smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --api-key sk-local --set engine.scheduling_policy=hybrid
    python examples/rl_gsm8k.py --tokenizer ../shared/data/models/smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out bench/results/rl_gsm8k_smollm2.json

Writes the per-iteration mean reward and the chat requests' latencies and SLO attainment to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import threading
import time

import numpy as np
import tinker
from tinker import types

from coserve_jax.tokenizer import encode_chat, load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "finetune" / "gsm8k" / "train.jsonl"
SYSTEM = "Solve the problem. Finish with 'The answer is N.' where N is a number."


def last_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def reward(text: str, stopped: bool, answer: str) -> float:
    """0.5 for an answer that ended by itself, 0.5 for the right final number."""
    return 0.5 * stopped + 0.5 * (last_number(text) == answer)


class ChatLoad(threading.Thread):
    """Chat requests at a fixed rate (Poisson arrivals), each timed for TTFT and TPOT (streamed)."""

    def __init__(self, base_url: str, api_key: str, model: str, rate: float, questions: list[str], seed: int = 0):
        super().__init__(daemon=True)
        import openai

        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
        self.model, self.rate, self.questions = model, rate, questions
        self.rng = np.random.default_rng(seed)
        self.records: list[dict] = []
        self.stop_event = threading.Event()
        self._workers: list[threading.Thread] = []

    def _one(self, q: str) -> None:
        t0 = time.perf_counter()
        first = None
        n = 0
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": q}], max_tokens=32, stream=True, temperature=0.7)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    n += 1
            end = time.perf_counter()
            self.records.append({"ttft_ms": 1e3 * ((first or end) - t0),
                                 "tpot_ms": 1e3 * (end - (first or end)) / max(n - 1, 1), "chunks": n})
        except Exception as e:  # a failed chat request is recorded, not fatal
            self.records.append({"error": f"{type(e).__name__}: {e}"})

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            self.stop_event.wait(self.rng.exponential(1.0 / self.rate))
            if self.stop_event.is_set():
                break
            w = threading.Thread(target=self._one, args=(self.questions[i % len(self.questions)],), daemon=True)
            w.start()
            self._workers.append(w)
            i += 1

    def finish(self) -> list[dict]:
        self.stop_event.set()
        for w in self._workers:
            w.join(600)
        return self.records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="sk-local")
    p.add_argument("--tokenizer", required=True, help="the served model's tokenizer (a directory or .gguf file)")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="questions per iteration")
    p.add_argument("--group-size", type=int, default=4, help="answers sampled per question")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--chat-rate", type=float, default=0.2, help="chat requests per second (0: none)")
    p.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=500.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()

    tok = load_tokenizer(args.tokenizer)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    rng = np.random.default_rng(args.seed)
    service = tinker.ServiceClient(base_url=args.base_url, api_key="tml-" + args.api_key)
    base_model = tinker.RestClient(base_url=args.base_url, api_key="tml-" + args.api_key) \
        .get_server_capabilities().result().supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=args.rank, seed=args.seed,
                                                   train_unembed=False).result()
    sampler = training.save_weights_and_get_sampling_client()
    chat = None
    if args.chat_rate > 0:
        chat = ChatLoad(args.base_url, args.api_key, base_model, args.chat_rate, [r["question"] for r in rows[-200:]])
        chat.start()
    history = []
    t_start = time.time()
    for it in range(args.iterations):
        t0 = time.time()
        picks = rng.choice(len(rows) - 200, args.batch, replace=False)
        futures = []
        for k in picks:
            r = rows[int(k)]
            prompt = encode_chat(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]}],
                                 add_generation_prompt=True)
            answer = r["answer"].split("####")[-1].strip().replace(",", "")
            params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=int(rng.integers(1 << 30)))
            futures.append((prompt, answer, sampler.sample(prompt=types.ModelInput.from_ints(prompt),
                                                           num_samples=args.group_size, sampling_params=params)))
        data, rewards, stopped, correct = [], [], [], []
        for prompt, answer, fut in futures:
            seqs = fut.result().sequences
            texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in seqs]
            rs = [reward(t, s.stop_reason == "stop", answer) for t, s in zip(texts, seqs)]
            rewards += rs
            stopped += [s.stop_reason == "stop" for s in seqs]
            correct += [last_number(t) == answer for t in texts]
            mean = float(np.mean(rs))
            for s, r_ in zip(seqs, rs):
                if r_ == mean or not s.tokens:
                    continue  # no advantage: nothing to learn from this answer
                tokens = list(prompt) + list(s.tokens)
                n_prompt = len(prompt) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:],
                                    "logprobs": [0.0] * n_prompt + list(s.logprobs),
                                    "advantages": [0.0] * n_prompt + [r_ - mean] * len(s.tokens)}))
        stats = {"iteration": it, "mean_reward": float(np.mean(rewards)), "stopped": float(np.mean(stopped)),
                 "correct": float(np.mean(correct)), "datums": len(data)}
        if data:
            fb = training.forward_backward(data, "importance_sampling")
            opt = training.optim_step(types.AdamParams(learning_rate=args.learning_rate))
            stats["loss"] = fb.result().metrics["loss:sum"]
            stats["grad_norm"] = opt.result().metrics["grad_norm"]
        sampler = training.save_weights_and_get_sampling_client()
        stats["seconds"] = round(time.time() - t0, 1)
        history.append(stats)
        print(json.dumps(stats), flush=True)
    records = chat.finish() if chat is not None else []
    ok = [r for r in records if "error" not in r]
    within = [r for r in ok if r["ttft_ms"] <= args.slo_ttft_ms and r["tpot_ms"] <= args.slo_tpot_ms]
    k = max(1, len(history) // 4)
    summary = {
        "first_iterations_mean_reward": float(np.mean([h["mean_reward"] for h in history[:k]])),
        "last_iterations_mean_reward": float(np.mean([h["mean_reward"] for h in history[-k:]])),
        "chat_requests": len(records), "chat_errors": len(records) - len(ok),
        "chat_slo_attainment": len(within) / len(records) if records else None,
        "chat_ttft_ms_p50": float(np.percentile([r["ttft_ms"] for r in ok], 50)) if ok else None,
        "chat_tpot_ms_p50": float(np.percentile([r["tpot_ms"] for r in ok], 50)) if ok else None,
        "wall_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "history": history,
                                        "summary": summary, "chat": records}, indent=1) + "\n")
    service.close("success").result()


if __name__ == "__main__":
    main()
