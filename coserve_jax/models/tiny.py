"""The built-in tiny model and tokenizer: what ``python -m coserve_jax`` and
``python -m coserve_jax.serve`` run with no arguments, so a new user sees the system work with
nothing downloaded.

The model is a 2-layer Llama-3-style decoder (hidden 64, GQA 4:1, Llama-3 RoPE scaling) with
random weights. The tokenizer is byte-level BPE with no merges (one token per UTF-8 byte, GPT-2's
byte-to-unicode alphabet), built with the Hugging Face ``tokenizers`` library, plus Llama-3's
special tokens and a Llama-3-style chat template, so chat requests and chat training files work
as they do on a real checkpoint.
"""

from __future__ import annotations

from coserve_jax.models.config import ModelConfig

TINY_HF_CONFIG = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=512,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
    ),
    torch_dtype="float32",
)
"""The Hugging Face ``config.json`` fields of the tiny model (``LlamaConfig``)."""

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""Llama 3's special tokens, ids 256..260 of :func:`byte_level_tokenizer`."""

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>")
"""Tokens that end an assistant turn in the Llama 3 and Qwen2 templates (generation stops at them)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama 3's chat format without its system-prompt preamble (Jinja, as in ``tokenizer_config.json``)."""


def tiny_config(
    vocab_size: int = 512, eos_token_ids: tuple[int, ...] = (), max_model_len: int | None = None, hf_overrides: dict | None = None
) -> ModelConfig:
    """The tiny model's :class:`ModelConfig`, with the vocabulary sized to a tokenizer.

    Args:
        vocab_size: embedding rows (``len(tokenizer)``; e.g. 128,256 with Llama 3's tokenizer).
        eos_token_ids: ids that end generation.
        max_model_len: context length in tokens (default 1024).
        hf_overrides: ``config.json`` fields replacing :data:`TINY_HF_CONFIG`'s (vLLM's
            ``--hf-overrides``), e.g. ``{"num_attention_heads": 8, "num_key_value_heads": 2}``.
    Raises:
        UnsupportedConfigError, ValueError: overrides that make an invalid config.
    """
    hf = dict(TINY_HF_CONFIG, vocab_size=vocab_size, eos_token_id=list(eos_token_ids) or None, **(hf_overrides or {}))
    return ModelConfig.from_hf_dict(hf, max_model_len=max_model_len)


def byte_level_tokenizer():
    """A ``transformers`` fast tokenizer of 261 tokens: the 256 bytes (ids 0..255, in GPT-2's
    byte-level alphabet order), then :data:`SPECIAL_TOKENS`; BOS ``<|begin_of_text|>`` is added
    to every encoded text, EOS is ``<|eot_id|>``, and the chat template is :data:`CHAT_TEMPLATE`.
    Any UTF-8 text round-trips exactly. Nothing is read from disk or downloaded.

    Returns:
        ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 upwards
    # in byte order; invert it to order the alphabet by byte value.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    c = ord(ch)
    if c in printable:
        return c
    others = [b for b in range(256) if b not in printable]
    return others[c - 256]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The ids of the tokenizer's EOS and of :data:`END_OF_TURN_TOKENS` it has."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))
