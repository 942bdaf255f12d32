"""Reading PEFT adapter directories defensively: every malformed adapter is an
:class:`AdapterFormatError` naming the problem, found before any tensor data is read, and a
file linked from outside the directory is refused."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from coserve_jax.lora.peft_io import AdapterFormatError, LoRAModule, LoRAWeights, PeftLimits, read_peft, write_peft
from coserve_jax.models.tiny import tiny_config

CONFIG = tiny_config()
LIMITS = PeftLimits(8, CONFIG.num_layers, {m: CONFIG.module_dims(m) for m in ("q_proj", "v_proj")})


def good_adapter(path, rank: int = 4) -> str:
    rng = np.random.default_rng(0)
    mods = {}
    for layer in range(CONFIG.num_layers):
        for m in ("q_proj", "v_proj"):
            d_in, d_out = CONFIG.module_dims(m)
            mods[(layer, m)] = LoRAModule(rng.normal(size=(d_in, rank)).astype(np.float32),
                                          rng.normal(size=(rank, d_out)).astype(np.float32), alpha=8.0)
    write_peft(LoRAWeights(mods), path, CONFIG.num_layers)
    return str(path)


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _config(d, text: bytes):
    with open(os.path.join(d, "adapter_config.json"), "wb") as f:
        f.write(text)


def _weights(d, blob: bytes):
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(blob)


MALFORMED = {
    "invalid JSON config": (lambda d: _config(d, b"{not json"), "not valid JSON"),
    "non-UTF-8 config": (lambda d: _config(d, b'{"r": "\xff\xfe"}'), "not UTF-8"),
    "a JSON list": (lambda d: _config(d, b"[1, 2]"), "must hold a JSON object"),
    "r is not a number": (lambda d: _config(d, json.dumps({"r": "abc", "peft_type": "LORA"}).encode()), "field 'r'"),
    "garbage safetensors": (lambda d: _weights(d, os.urandom(64)), "header"),
    "a header claiming a 4 TB tensor": (lambda d: _weights(d, safetensors_bytes(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
         {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}, b"\0" * 64)), "outside the file"),
    "a header length of 2**60": (lambda d: _weights(d, struct.pack("<Q", 1 << 60) + b"{}"), "header length"),
    "a rank past the pool's": (lambda d: good_adapter(d, rank=32), "exceeds this server's max_lora_rank="),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapters_are_refused_with_a_reason(tmp_path, case):
    d = good_adapter(tmp_path / "a")
    read_peft(d, LIMITS)  # the intact adapter reads
    make, reason = MALFORMED[case]
    make(d)
    with pytest.raises(AdapterFormatError, match=reason):
        read_peft(d, LIMITS)


def test_a_config_linked_from_outside_the_directory_is_refused(tmp_path):
    d = good_adapter(tmp_path / "a")
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    os.unlink(os.path.join(d, "adapter_config.json"))
    os.symlink(outside, os.path.join(d, "adapter_config.json"))
    with pytest.raises(AdapterFormatError, match="outside the adapter directory"):
        read_peft(d)


def test_shapes_are_checked_against_the_pool_before_reading(tmp_path):
    d = good_adapter(tmp_path / "a")
    only_q = PeftLimits(8, CONFIG.num_layers, {"q_proj": CONFIG.module_dims("q_proj")})
    with pytest.raises(AdapterFormatError, match="not a LoRA weight of a module this server's pool covers"):
        read_peft(d, only_q)
    fewer_layers = PeftLimits(8, 1, LIMITS.module_dims)
    with pytest.raises(AdapterFormatError, match="layer 1, the model has 1"):
        read_peft(d, fewer_layers)
