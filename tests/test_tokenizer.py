"""Tokenizers and chat templates from local directories, against independent ground truth."""

import pytest
from conftest import shared_data

from coserve_jax.tokenizer import encode_chat, load_tokenizer, render_chat


def ground_truth(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 cases: inputs split on the marker, one line of ids per input."""
    base = shared_data("tokenizers", "ground_truth")
    inputs = (base / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (base / f"{name}.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) == len(outputs)
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outputs)]


@pytest.mark.parametrize("tokenizer_dir, truth", [("llama3", "ggml-vocab-llama-bpe.gguf"), ("qwen2_5", "ggml-vocab-qwen2.gguf")])
def test_tokenizer_reproduces_ground_truth_ids(tokenizer_dir, truth):
    tokenizer = load_tokenizer(shared_data("tokenizers", tokenizer_dir))
    cases = ground_truth(truth)
    assert len(cases) >= 46
    for text, ids in cases:
        assert tokenizer.encode(text, add_special_tokens=False) == ids, repr(text)


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_llama31_chat_template_renders_as_transformers_does():
    tokenizer = load_tokenizer(shared_data("tokenizers", "llama3"))
    ours = render_chat(tokenizer, CONVERSATION, date_string="26 Jul 2024")
    # transformers with the template published with Llama-3.1-8B-Instruct (llama.cpp's copy).
    template = shared_data("tokenizers", "chat_templates", "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()
    reference = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024"
    )
    assert ours == reference
    # Meta's documented Llama 3.1 prompt format.
    assert ours == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = encode_chat(tokenizer, CONVERSATION, date_string="26 Jul 2024")
    # <|begin_of_text|> 128000, <|start_header_id|> 128006, <|end_header_id|> 128007, <|eot_id|> 128009
    assert ids[:3] == [128000, 128006, 9125] and ids.count(128009) == 4 and ids[-2:] == [128007, 271]


def test_qwen25_chat_template_default_system_prompt():
    tokenizer = load_tokenizer(shared_data("tokenizers", "qwen2_5"))
    assert render_chat(tokenizer, [{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_override_from_file(tmp_path):
    tokenizer_dir = shared_data("tokenizers", "llama2")
    tokenizer = load_tokenizer(tokenizer_dir)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tokenizer = load_tokenizer(tokenizer_dir, chat_template=template)
    assert render_chat(tokenizer, [{"role": "user", "content": "x"}]) == "[user] x\n"


def test_missing_tokenizer_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
