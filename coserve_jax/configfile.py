"""YAML run configs (``configs/*/*.yaml``) read with PyYAML into frozen dataclasses.

Shared by the benchmark (:mod:`coserve_jax.bench.config`) and the server
(:mod:`coserve_jax.serve.config`): unknown keys are errors that name the key, so a typo never
silently runs a default, and ``KEY=VALUE`` command-line overrides (dotted keys, YAML values)
apply on top of a file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config that cannot be used: names the file (or flag) and the offending key."""


def strict(cls, data: Any, where: str):
    """``cls(**data)`` for a dataclass ``cls``, with unknown keys and bad values as
    :class:`ConfigError` naming ``where``; ``None`` gives ``cls()``."""
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {sorted(names)})")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (an empty file gives ``{}``).

    Raises:
        FileNotFoundError: no such file. ConfigError: invalid YAML or not a mapping.
    """
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{os.fspath(path)}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{os.fspath(path)}: expected a mapping at the top level")
    return dict(data)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with ``KEY=VALUE`` overrides applied: ``KEY`` is dotted
    (``engine.max_num_seqs``), ``VALUE`` is parsed as YAML (``8``, ``null``, ``[32, 128]``).

    Raises:
        ConfigError: an override without ``=``, or a dotted key through a non-mapping.
    """
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. engine.max_num_seqs=8)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid YAML value: {e}") from None
        set_key(out, key, value)
    return out


def set_key(data: dict, key: str, value: Any) -> None:
    """Set dotted ``key`` of ``data`` in place, creating sections as needed.

    Raises:
        ConfigError: a dotted key through a non-mapping.
    """
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(d: Mapping[str, Any]) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}
