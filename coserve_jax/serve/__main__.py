"""``python -m coserve_jax.serve``: the OpenAI-compatible server (inference and fine-tuning jobs).

With no arguments it serves the built-in tiny model (random weights, byte-level tokenizer,
nothing downloaded) on http://127.0.0.1:8000/v1. ``--config configs/serve/NAME.yaml`` reads a
config; flags and ``--set KEY=VALUE`` override it (see :mod:`coserve_jax.serve.config`).
SIGINT / SIGTERM shut down gracefully: open requests finish (up to
``timeout_graceful_shutdown_s``), running fine-tuning jobs are checkpointed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from coserve_jax.configfile import ConfigError
from coserve_jax.serve.config import ServeConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coserve_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (configs/serve/*.yaml)")
    p.add_argument("--model", help="local Hugging Face checkpoint directory or llama.cpp .gguf file (default: the built-in tiny model)")
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf file (default: the checkpoint's; sizes the tiny model's vocabulary)")
    p.add_argument("--chat-template", help="Jinja chat template (file or string) replacing the tokenizer's")
    p.add_argument("--served-model-name", help="the base model's name in the API")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $COSERVE_API_KEY, else none)")
    p.add_argument("--api-keys-file", help="YAML or JSON list of {key, project, admin}: several keys, one project "
                   "(tenant) each; keys can also be kept in the database (python -m coserve_jax.serve.keys)")
    p.add_argument("--output-dir", help="uploaded files, checkpoints and exported adapters (default coserve-output)")
    p.add_argument("--database-url", help="SQLAlchemy URL of the server's state: files, jobs, events, keys "
                   "(default: SQLite, OUTPUT_DIR/coserve.db; e.g. postgresql://user@host/db)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted, YAML value (e.g. --set engine.max_num_seqs=8); repeatable")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"),
                   help="level of the server's and uvicorn's loggers (default info)")
    p.add_argument("--disable-log-requests", action="store_true", default=None,
                   help="no access-log line per HTTP request (vLLM's flag)")
    p.add_argument("--disable-log-stats", action="store_true", default=None,
                   help="no periodic stats line (throughput, queue, KV cache, finetuning; vLLM's flag)")
    p.add_argument("--lora-root", action="append", default=None, metavar="DIR",
                   help="a directory POST /v1/load_lora_adapter may read adapters from (repeatable; symbolic links "
                   "out of it are refused); without one, only admin keys may load adapters, from anywhere")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="PEFT adapters to load at start-up, served under NAME (vLLM's flag)")
    knobs = p.add_argument_group("model and engine (vLLM's names; each sets the config key it names)")
    for flag, key, doc in engine_flags():
        knobs.add_argument(flag, dest=key, type=_yaml_value, default=None, metavar="VALUE", help=f"{key}: {doc}")
    return p


def _yaml_value(text: str):
    """A flag's value read as YAML, as ``--set`` reads it (``16``, ``true``, ``null``, ``[32, 128]``)."""
    import yaml

    return yaml.safe_load(text)


def engine_flags() -> list[tuple[str, str, str]]:
    """``(flag, config key, help)`` for every model-section field and ``Engine`` keyword argument
    the config accepts, named as vLLM names them (``--max-model-len``, ``--max-num-seqs``,
    ``--tensor-parallel-size`` ...): generated from the config and the signature, not listed by hand."""
    import dataclasses
    import inspect

    from coserve_jax.engine import Engine
    from coserve_jax.serve.config import RESERVED_ENGINE_KEYS, ModelSection

    out = []
    skip = {"path", "tokenizer", "chat_template"}  # flags of their own above
    for f in dataclasses.fields(ModelSection):
        if f.name not in skip and f.name != "seed":  # (--seed is the engine's: the requests' seeds)
            out.append((f"--{f.name.replace('_', '-')}", f"model.{f.name}", f"model section, default {f.default!r}"))
    for name, param in inspect.signature(Engine.__init__).parameters.items():
        if name not in ("self", *RESERVED_ENGINE_KEYS):
            default = param.default
            shown = "a path under ~/.cache" if name == "compilation_cache_dir" else repr(default)
            out.append((f"--{name.replace('_', '-')}", f"engine.{name}", f"Engine argument, default {shown}"))
    return out


def config_from_args(argv: list[str] | None = None) -> ServeConfig:
    """The :class:`ServeConfig` of a command line (file < flags < ``--set``).

    Raises:
        ConfigError, FileNotFoundError: as :func:`coserve_jax.serve.config.load_config`.
    """
    args = build_parser().parse_args(argv)
    flags = {
        "model.path": args.model, "model.tokenizer": args.tokenizer, "model.chat_template": args.chat_template,
        "served_model_name": args.served_model_name, "host": args.host, "port": args.port, "api_key": args.api_key,
        "api_keys_file": args.api_keys_file, "output_dir": args.output_dir, "database_url": args.database_url, "log_level": args.log_level, "disable_log_requests": args.disable_log_requests,
        "disable_log_stats": args.disable_log_stats,
    }
    flags.update({key: getattr(args, key) for _, key, _ in engine_flags()})
    if args.lora_root is not None:
        flags["lora_roots"] = list(args.lora_root)
    if args.lora_modules is not None:
        modules = {}
        for item in args.lora_modules:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora-modules takes NAME=PATH items, got {item!r}")
            modules[name] = path
        flags["lora_modules"] = modules
    if args.api_key is None and os.environ.get("COSERVE_API_KEY"):
        flags["api_key"] = os.environ["COSERVE_API_KEY"]
    return load_config(args.config, args.set, {k: v for k, v in flags.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if cfg.api_keys_file:
        from coserve_jax.serve.auth import read_keys_file

        try:
            read_keys_file(cfg.api_keys_file)  # checked before the engine is built
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: api_keys_file: {e}", file=sys.stderr)
            return 2

    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from coserve_jax.serve.db import Database

    try:  # reachable and at the newest schema, before the engine is built
        Database(cfg.database()).close()
    except (ArgumentError, SQLAlchemyError, ImportError, OSError) as e:
        print(f"error: database {cfg.database_url or cfg.database()!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    from coserve_jax.logging_config import configure_logging

    try:
        log_config = configure_logging(cfg.log_level, access_log=not cfg.disable_log_requests)
    except ValueError as e:
        print(f"error: log_level: {e}", file=sys.stderr)
        return 2

    import jax
    import uvicorn

    from coserve_jax.serve.app import ServerState, create_app
    from coserve_jax.serve.model import build_engine

    from coserve_jax.parallel.distributed import initialize_distributed

    try:
        initialize_distributed(cfg.engine_kwargs().get("distributed"))  # before any device is touched
    except RuntimeError as e:  # the coordinator was not reachable in time
        print(f"error: cannot join the multi-host job: {e}", file=sys.stderr)
        return 1
    print(f"coserve-jax: jax {jax.__version__} on {jax.devices()[0].platform}; building the engine ...", flush=True)
    t0 = time.perf_counter()
    try:
        engine, name = build_engine(cfg)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad model dir, tokenizer or engine settings
        print(f"error: cannot build the engine: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"coserve-jax: model {name!r} ({engine.config.num_params():,} parameters, context {engine.max_model_len} tokens), "
          f"{len(engine.buckets)} step shapes compiled, ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if jax.process_count() > 1:  # multi-host: HTTP goes to process 0; the others run the steps it publishes
        if jax.process_index() != 0:
            print(f"coserve-jax: process {jax.process_index()} of {jax.process_count()}: following process 0", flush=True)
            steps = engine.follow()
            print(f"coserve-jax: process {jax.process_index()}: process 0 stopped after {steps} steps; stopped.", flush=True)
            return 0
        engine.lead()
    from coserve_jax.lora.manager import AdapterError
    from coserve_jax.lora.peft_io import AdapterFormatError

    for lora_name, lora_path in (cfg.lora_modules or {}).items():  # after lead(): the followers load them too
        try:
            engine.load_adapter(lora_name, lora_path)
        except (AdapterError, AdapterFormatError, OSError) as e:
            print(f"error: cannot load LoRA adapter {lora_name!r} from {lora_path!r}: {e}", file=sys.stderr)
            if jax.process_count() > 1:
                engine.stop_followers()
            return 2
        print(f"coserve-jax: LoRA adapter {lora_name!r} loaded from {lora_path}", flush=True)
    state = ServerState(cfg, engine, name)
    app = create_app(state)

    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 1
    sock.listen(2048)
    port = sock.getsockname()[1]
    url = f"http://{cfg.host}:{port}/v1"

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.begin_shutdown(cfg.timeout_graceful_shutdown_s)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                auth = " (API key required)" if state.keys.required else ""
                print(f"coserve-jax: serving {name!r} at {url}{auth}; ready. Ctrl-C stops "
                      "(running fine-tuning jobs are checkpointed).", flush=True)

    from coserve_jax.serve.protocol_timeouts import h11_with_header_timeout

    server = Server(uvicorn.Config(
        app, log_config=log_config, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.timeout_graceful_shutdown_s,
        access_log=not cfg.disable_log_requests, http=h11_with_header_timeout(cfg.timeout_header_s),
        timeout_keep_alive=cfg.timeout_keep_alive_s,
    ))
    # uvicorn handles SIGINT / SIGTERM during run() and re-raises the signal once shut down; a
    # no-op handler then lets the process end normally (exit 0) after a graceful shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("coserve-jax: stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
