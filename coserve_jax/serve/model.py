"""The engine a server config describes: a local checkpoint (Hugging Face directory or GGUF
file), or the built-in tiny model."""

from __future__ import annotations

import os

from coserve_jax.engine import Engine
from coserve_jax.parallel.distributed import initialize_distributed
from coserve_jax.serve.config import ServeConfig


def build_engine(cfg: ServeConfig) -> tuple[Engine, str]:
    """Build (and compile) the engine. Returns ``(engine, served model name)``.

    The tiny model (``model.path`` unset) has random weights and a vocabulary sized to its
    tokenizer: the built-in byte-level one, or ``model.tokenizer`` (e.g. Llama 3's 128,256
    tokens, so that real chat templates and text work end to end); generation stops at the
    tokenizer's EOS and end-of-turn tokens.

    Raises:
        FileNotFoundError, ValueError: a bad model or tokenizer directory, bad engine settings.
    """
    m = cfg.model
    kw = cfg.engine_kwargs()
    initialize_distributed(kw.get("distributed"))  # before any device is touched
    if not cfg.is_tiny:
        engine = Engine(m.path, tokenizer=_tokenizer(m) if m.tokenizer or m.chat_template else None, dtype=m.dtype,
                        max_model_len=m.max_model_len, **kw)
        if engine.tokenizer is None:
            raise ValueError(f"{m.path} has no tokenizer files: give model.tokenizer (--tokenizer)")
        return engine, cfg.served_model_name or default_model_name(m.path)

    from coserve_jax.lora import LoRAPoolConfig
    from coserve_jax.models import init_random
    from coserve_jax.models.config import LINEAR_MODULES
    from coserve_jax.models.tiny import byte_level_tokenizer, end_of_turn_ids, tiny_config
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    tokenizer = _tokenizer(m) if m.tokenizer else byte_level_tokenizer()
    if m.chat_template and not m.tokenizer:
        tokenizer.chat_template = _template_text(m.chat_template)
    config = tiny_config(len(tokenizer), end_of_turn_ids(tokenizer), max_model_len=m.max_model_len, hf_overrides=m.hf_overrides)
    pool = None
    max_loras = kw.pop("max_loras", 4)
    rank = kw.pop("max_lora_rank", 16)
    modules = tuple(kw.pop("lora_target_modules", LINEAR_MODULES))
    if max_loras > 0:
        pool = LoRAPoolConfig(max_loras, rank, modules)
    rules = ShardingRules(config, make_mesh(kw.get("tensor_parallel_size", 1)))
    model = init_random(config, m.seed, dtype=m.dtype, lora=pool, sharding=rules.sharding)
    return Engine(model, tokenizer=tokenizer, **kw), cfg.served_model_name or "coserve-tiny"


def default_model_name(path: str) -> str:
    """The served name of a checkpoint: its directory's name, or a GGUF file's name without ``.gguf``."""
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def _tokenizer(m):
    from coserve_jax.tokenizer import load_tokenizer

    return load_tokenizer(m.tokenizer or m.path, chat_template=m.chat_template)


def _template_text(t: str) -> str:
    if os.path.isfile(t):
        with open(t, encoding="utf-8") as f:
            return f.read()
    return t
