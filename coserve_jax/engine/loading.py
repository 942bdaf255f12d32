"""What an engine is built from: the model (placed on the mesh), its tokenizer and its EOS ids.

A model is a local Hugging Face checkpoint directory, a llama.cpp ``.gguf`` file, or a built
:class:`~coserve_jax.models.decoder.CausalLM`; the tokenizer comes from the checkpoint (its
files or the GGUF metadata) unless one is given, and the EOS ids from ``generation_config.json``
(as Hugging Face's ``generate`` reads them), else the model config, else the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import jax
from flax import nnx

from coserve_jax.models.config import ModelConfig
from coserve_jax.models.decoder import CausalLM
from coserve_jax.models.loader import is_gguf, load_config, load_model
from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.parallel.rules import ShardingRules


@dataclasses.dataclass
class LoadedModel:
    """A model placed on its mesh, with what the engine needs beside it.

    Attributes:
        model: the :class:`CausalLM` (weights placed by ``rules``).
        rules: the :class:`~coserve_jax.parallel.rules.ShardingRules` of the mesh.
        path: the checkpoint path (``None`` for a built model).
        tokenizer: a tokenizer, or ``None`` (token ids only).
        eos_token_ids: the ids that end generation.
    """

    model: CausalLM
    rules: ShardingRules
    path: str | None
    tokenizer: object
    eos_token_ids: frozenset[int]


def load_engine_model(
    model: str | os.PathLike | CausalLM,
    mesh: jax.sharding.Mesh,
    *,
    tokenizer=None,
    dtype="auto",
    max_model_len: int | None = None,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    lora_target_modules: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load (or place) a model on ``mesh`` with an adapter pool of ``max_loras`` slots of rank
    ``max_lora_rank`` over ``lora_target_modules`` (none when ``max_loras`` is 0; a built model
    keeps its own pool and dtype), and find its tokenizer and EOS ids. A GGUF file's converted
    tokenizer is kept under ``cache_dir/tokenizers`` (``None``: not kept).

    Raises:
        FileNotFoundError, UnsupportedConfigError, CheckpointError: from loading the model.
    """
    if isinstance(model, CausalLM):
        rules = ShardingRules(model.config, mesh)
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, rules.state_shardings(state)))
        path = None
    else:
        path = os.fspath(model)
        lora = LoRAPoolConfig(max_loras, max_lora_rank, tuple(lora_target_modules)) if max_loras > 0 else None
        rules = ShardingRules(load_config(path, max_model_len=max_model_len), mesh)
        model = load_model(path, dtype=dtype, lora=lora, max_model_len=max_model_len, sharding=rules.sharding)
    tok = resolve_tokenizer(tokenizer, path, None if cache_dir is None else os.path.join(os.fspath(cache_dir), "tokenizers"))
    return LoadedModel(model, rules, path, tok, eos_ids(path, model.config, tok))


def resolve_tokenizer(tokenizer, path: str | None, cache_dir: str | os.PathLike | None = None):
    """The tokenizer to use: ``tokenizer`` itself (a loaded one), or loaded from a directory or
    ``.gguf`` file it names, or, when ``None``, the checkpoint's own if it has one (else ``None``).
    A GGUF file's converted tokenizer is kept in ``cache_dir`` (``None``: not kept)."""
    if tokenizer is None and path is not None and is_gguf(path):
        from coserve_jax.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path, cache_dir=cache_dir)
    if tokenizer is None and path is not None:
        p = pathlib.Path(path)
        if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            tokenizer = p
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from coserve_jax.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer)


def eos_ids(path: str | None, config: ModelConfig, tokenizer) -> frozenset[int]:
    """The EOS ids: ``generation_config.json``'s ``eos_token_id`` beside the checkpoint (it wins,
    as in Hugging Face's ``GenerationConfig``), else the model config's, else the tokenizer's."""
    ids = set(config.eos_token_ids)
    if path is not None:
        gen = pathlib.Path(path) / "generation_config.json"  # (none beside a .gguf file: its metadata has the EOS)
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                ids = set(eos if isinstance(eos, list) else [eos])
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
