"""The server under load through HTTP: client-side TTFT / TPOT and throughput with the `openai`
client, without and with a fine-tuning job training in the same steps.

Starts ``python -m coserve_jax.serve`` (built-in tiny model unless ``--server-args`` say
otherwise) on a free loopback port, measures its start-up, then runs ``--concurrency`` client
threads that each send ``--requests`` streaming chat requests of ``--max-tokens`` tokens
(``ignore_eos``), first alone, then while a fine-tuning job (synthetic chat records, LoRA r=8)
trains. Reads the finetuning throughput from ``/metrics``.

    python bench/serve_load.py --out bench/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def start_server(args: list[str], out_dir: str) -> tuple[subprocess.Popen, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "coserve_jax.serve", "--port", "0", "--output-dir", out_dir, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1.*ready", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1), time.perf_counter() - t0
    raise RuntimeError("the server exited before it was ready")


def load(client, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    ttft, tpot, tokens = [], [], []
    lock = threading.Lock()

    def worker(i):
        for j in range(requests):
            t0 = time.perf_counter()
            first = None
            n = 0
            stream = client.chat.completions.create(
                model=model, stream=True, max_tokens=max_tokens, temperature=0.8, seed=i * 1000 + j,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": f"Request {i}-{j}: tell me a long story about the number {j}."}])
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            end = time.perf_counter()
            with lock:
                ttft.append(1e3 * ((first or end) - t0))
                if n > 1 and first is not None:
                    tpot.append(1e3 * (end - first) / (n - 1))
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(xs, q):
        return round(statistics.quantiles(xs, n=100)[q - 1], 2) if len(xs) > 1 else None

    return {"requests": len(tokens), "output_tokens": sum(tokens), "wall_s": round(wall, 2),
            "output_tokens_per_s": round(sum(tokens) / wall, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p90": pct(ttft, 90), "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p90": pct(tpot, 90)}


def metric(http, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client thread")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra server arguments, one string")
    args = ap.parse_args(argv)
    import httpx
    import jax
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        proc, url, startup = start_server(shlex.split(args.server_args), os.path.join(tmp, "out"))
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
            http = httpx.Client(base_url=url, timeout=60)
            model = client.models.list().data[0].id
            load(client, model, 2, 1, 8)  # warm-up
            alone = load(client, model, args.concurrency, args.requests, args.max_tokens)

            data = os.path.join(tmp, "train.jsonl")
            with open(data, "w") as f:
                for i in range(64):
                    msgs = [{"role": "user", "content": f"What is {i} times 3?"}, {"role": "assistant", "content": f"{i} times 3 is {3 * i}."}]
                    f.write(json.dumps({"messages": msgs}) + "\n")
            fid = client.files.create(file=open(data, "rb"), purpose="fine-tune").id
            job = client.fine_tuning.jobs.create(model=model, training_file=fid, hyperparameters={"max_steps": 100000},
                                                 extra_body={"lora": {"r": 8, "lora_alpha": 16}})
            time.sleep(2)
            tok0, t0 = metric(http, "coserve:finetune_tokens_total"), time.perf_counter()
            together = load(client, model, args.concurrency, args.requests, args.max_tokens)
            together["finetune_tokens_per_s"] = round((metric(http, "coserve:finetune_tokens_total") - tok0) / (time.perf_counter() - t0), 1)
            time.sleep(3)
            t1, tok1 = time.perf_counter(), metric(http, "coserve:finetune_tokens_total")
            time.sleep(5)
            alone_ft = round((metric(http, "coserve:finetune_tokens_total") - tok1) / (time.perf_counter() - t1), 1)
            client.fine_tuning.jobs.cancel(job.id)
        finally:
            proc.terminate()
            proc.wait(120)
    result = {
        "command": "python bench/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
        "server_startup_s": round(startup, 1),
        "concurrency": args.concurrency, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "inference_alone": alone, "inference_with_finetuning": together, "finetuning_alone_tokens_per_s": alone_ft,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
