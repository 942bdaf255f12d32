"""Write small GGUF files as llama.cpp's converter (``convert_hf_to_gguf.py``) does, with
``gguf.GGUFWriter``: from a ``transformers`` Llama / Qwen2 model, with the tensor types asked for.

Written the converter's way: llama.cpp tensor names, Q/K rows of ``llama`` permuted for its RoPE
(``LlamaModel.permute``), PyTorch ``[out, in]`` weights (GGUF shape ``[in, out]``), no
``output.weight`` when the embeddings are tied.
"""

from __future__ import annotations

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import quants

QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
"""Types ``gguf.quants.quantize`` writes; the K-quants below get random blocks instead."""

# Byte offsets of the float16 super-block scales in the K-quant blocks (ggml-common.h).
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q5_K: (0, 2), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (rows of a Q/K weight or bias to interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(rows: int, cols: int, qtype, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random K-quant data ``[rows, bytes]`` whose float16 block scales are small and finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        d = (rng.uniform(0.5, 1.0, (rows, cols // block)) * scale).astype(np.float16)
        data[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``w`` (float32, numpy layout) as the bytes of ``qtype`` (random blocks for K-quants)."""
    if qtype in QUANTIZABLE:
        return quants.quantize(np.ascontiguousarray(w, np.float32), qtype)
    scale = {Q.Q4_K: 2e-5, Q.Q6_K: 5e-6, Q.Q5_K: 1e-5, Q.Q2_K: 1e-4, Q.Q3_K: 2e-5}[qtype]
    return random_k_blocks(w.shape[0], w.shape[1], qtype, rng, scale)


def write_gguf(path, model, arch: str = "llama", qtype=Q.F32, *, extra_metadata=None, drop=(), extra_tensors=None, seed=0):
    """Write ``model`` (a ``transformers`` LlamaForCausalLM / Qwen2ForCausalLM) to ``path``.

    Args:
        qtype: type of the 2-D weights (linears, embedding, LM head); norms and biases stay F32.
        extra_metadata: ``{key: value}`` added (strings, ints, floats) or, with value ``None``, removed.
        drop: tensor names left out.
        extra_tensors: ``{name: (array, type)}`` added: float32 values to encode, or (uint8)
            the raw bytes of that type.
    Returns:
        ``{gguf tensor name: float32 array as stored (dequantized), numpy layout}``.
    """
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    meta = {
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv,
        f"{arch}.rope.freq_base": float(theta), f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.dimension_count": head_dim, f"{arch}.vocab_size": cfg.vocab_size,
        "general.file_type": 0 if qtype == Q.F32 else 7, "general.name": "tiny test model",
    }
    for k, v in (extra_metadata or {}).items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    for k, v in meta.items():
        if k == "general.architecture":
            continue
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, int(v))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names[f"model.layers.{i}.input_layernorm.weight"] = f"blk.{i}.attn_norm.weight"
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = f"blk.{i}.ffn_norm.weight"
        for hf, g in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{g}.{kind}"
    stored = {}
    todo = []
    for hf_name, g in names.items():
        if hf_name not in sd or g in drop:
            continue
        t = sd[hf_name]
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            t = permute(t, heads if ".attn_q." in g else kv)
        todo.append((g, t, qtype if t.ndim == 2 else Q.F32))
    for g, (t, ty) in (extra_tensors or {}).items():
        todo.append((g, t, ty))
    for g, t, ty in todo:
        if t.dtype == np.uint8:
            data = t  # raw bytes of `ty`
        else:
            data = encode(t, ty, rng) if ty != Q.F32 else np.ascontiguousarray(t, np.float32)
        if ty == Q.F32:
            w.add_tensor(g, data)
        elif ty == Q.F16:
            w.add_tensor(g, data)
        else:
            w.add_tensor(g, data, raw_dtype=ty)
        if ty in (Q.F32, Q.F16):
            stored[g] = np.asarray(data, np.float32)
        elif t.dtype != np.uint8:
            stored[g] = quants.dequantize(data, ty).reshape(t.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
