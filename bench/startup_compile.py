"""Start-up time: cold and warm, to "ready" and to "every shape compiled".

Three models:

* ``tiny``: ``python -m coserve_jax.serve`` with its built-in tiny model (finetuning on);
* ``smollm2``: ``python -m coserve_jax.serve --config configs/serve/smollm2.yaml --model <GGUF>``
  (SmolLM2-135M-Instruct from ../shared/data; skipped with a message when absent);
* ``llama-8b``: compile-only at Llama-3.1-8B shape (abstract weights: nothing is allocated but
  the KV cache and the finetuning buffers), the engine's step buckets, backwards and idle train
  steps of ``configs/serve/llama-3.1-8b.yaml`` (on this CPU with the reference attention).

A server run starts a fresh process with ``$COSERVE_JAX_CACHE_DIR`` pointing at a directory of
its own: "cold" with an empty one, "warm" with what the cold run left (the executable cache and
the XLA compilation cache). ``ready_s`` is process start to the first ``200`` of ``GET /health``
(the server answers requests from then on); ``all_compiled_s`` is process start to the log line
saying the background compilation is done. ``--no-background`` adds cold runs with
``--compile-in-background false`` (everything compiled before serving, the previous behaviour).

    python bench/startup_compile.py --out bench/results/startup_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF = ROOT.parent / "shared" / "data" / "models" / "smollm2_135m_instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = re.compile(r"background compilation done: every executable ready ([0-9.]+) s")
LOADED = re.compile(r"executables: (\d+) loaded from .*?, (\d+) compiled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_startup(model: str, cache_dir: str, background: bool, timeout: float = 1800.0) -> dict:
    """Start the server, time it to ready and to every shape compiled, stop it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "coserve_jax.serve", "--port", str(port), "--compile-in-background", str(background).lower()]
    if model == "smollm2":
        cmd += ["--config", str(ROOT / "configs" / "serve" / "smollm2.yaml"), "--model", str(GGUF)]
    env = {**os.environ, "COSERVE_JAX_CACHE_DIR": cache_dir}
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd + ["--output-dir", out], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        ready = None
        try:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read()[-3000:]}")
                if ready is None:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                            if r.status == 200:
                                ready = time.perf_counter() - t0
                    except OSError:
                        pass
                log.seek(0)
                text = log.read()
                if ready is not None and (DONE.search(text) or not background):
                    break
                time.sleep(0.25)
        finally:
            proc.terminate()
            proc.wait(60)
        log.seek(0)
        text = log.read()
    loaded = LOADED.findall(text)
    row = {"model": model, "compile_in_background": background, "ready_s": round(ready, 1) if ready else None,
           "all_compiled_s": _all_compiled(text, ready, background)}
    if loaded:
        row["executables_loaded"], row["executables_compiled"] = map(int, loaded[-1])
    return row


def _all_compiled(text: str, ready: float | None, background: bool) -> float | None:
    """Process start to every executable compiled: the log line's time since the engine's
    compilation began, plus the process's time before that (ready minus the foreground part)."""
    if ready is None:
        return None
    if not background:
        return round(ready, 1)
    m = DONE.search(text)
    fg = re.search(r"engine ready: compiled in ([0-9.]+) s", text)
    if not m or not fg:
        return None
    return round(ready - float(fg.group(1)) + float(m.group(1)), 1)


CHILD_8B = r"""
import json, os, sys, time
t0 = time.perf_counter()
from coserve_jax.configfile import read_yaml
from coserve_jax.engine.model_runner import compile_abstract
from coserve_jax.models import ModelConfig, init_abstract
from coserve_jax.models.lora_pool import LoRAPoolConfig
cfg = ModelConfig.from_hf_dict(json.load(open(sys.argv[1])))
serve = read_yaml(sys.argv[2])
knobs = dict(serve["engine"], max_model_len=serve["model"]["max_model_len"], **json.loads(sys.argv[4]))
model = init_abstract(cfg, dtype=serve["model"]["dtype"],
                      lora=LoRAPoolConfig(knobs.pop("max_loras", 4), knobs.pop("max_lora_rank", 16)))
counts = compile_abstract(model, knobs, sys.argv[3])
print(json.dumps({"compile_s": round(time.perf_counter() - t0, 1), **counts}))
"""


def compile_only_8b(cache_dir: str, overrides: dict) -> dict:
    """Compile-only at Llama-3.1-8B shape in a fresh process (see the module docstring)."""
    hf = ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json"
    serve = ROOT / "configs" / "serve" / "llama-3.1-8b.yaml"
    out = subprocess.run([sys.executable, "-c", CHILD_8B, str(hf), str(serve), cache_dir, json.dumps(overrides)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COSERVE_JAX_CONFIGURE_LOGGING": "0"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return {"model": "llama-8b (compile-only)", "overrides": overrides, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2", "llama-8b"])
    ap.add_argument("--no-background", action="store_true", help="also cold runs with --compile-in-background false")
    ap.add_argument("--llama-8b-set", default="{}", metavar="JSON",
                    help="engine knobs replacing configs/serve/llama-3.1-8b.yaml's for the compile-only run, "
                         "e.g. '{\"token_buckets\": [2048], \"seq_buckets\": [128]}'")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for model in args.models:
        if model == "smollm2" and not GGUF.exists():
            print(f"skipping smollm2: {GGUF} is absent")
            continue
        with tempfile.TemporaryDirectory() as cache:
            runs = [("cold", True), ("warm", True)]
            if args.no_background and model != "llama-8b":
                runs.insert(0, ("cold", False))
            for start, background in runs:
                if start == "cold":
                    for p in pathlib.Path(cache).iterdir():
                        subprocess.run(["rm", "-rf", str(p)], check=True)
                if model == "llama-8b":
                    row = compile_only_8b(cache, json.loads(args.llama_8b_set))
                else:
                    row = serve_startup(model, cache, background)
                row["start"] = start
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        import jax

        with open(args.out, "w") as f:
            json.dump({"command": "python bench/startup_compile.py " + " ".join(sys.argv[1:]), "jax": jax.__version__,
                       "cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
