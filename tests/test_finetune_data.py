"""Finetuning data: formats, loss masks, and up-front validation with line numbers."""

import json

import pytest
from conftest import shared_data

from coserve_jax.finetune.data import ALPACA_PROMPT_NO_INPUT, DataValidationError, load_dataset, read_records
from coserve_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(shared_data("tokenizers", "llama3"))


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def masked_text(tok, ex):
    return tok.decode([t for t, m in zip(ex.token_ids, ex.loss_mask) if m])


def test_formats_and_masks(tok, tmp_path):
    rows = [
        {"text": "Plain text for language modelling."},
        {"instruction": "Add the numbers.", "input": "", "output": "It is 5."},
        {"prompt": "2+3=", "completion": "5"},
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]},
    ]
    exs = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    text, alpaca, pc, chat = exs
    eos = tok.eos_token
    assert masked_text(tok, text) == "Plain text for language modelling." + eos  # all but BOS
    assert masked_text(tok, alpaca) == "It is 5." + eos
    assert tok.decode(alpaca.token_ids, skip_special_tokens=True).startswith(ALPACA_PROMPT_NO_INPUT.format(instruction="Add the numbers."))
    assert masked_text(tok, pc) == "5" + eos
    # chat: the two assistant turns (with their end-of-turn tokens), nothing of system/user
    trained = masked_text(tok, chat)
    assert "Hello!" in trained and "Goodbye." in trained
    assert "Hi there" not in trained and "Bye<" not in trained and "Be brief" not in trained
    assert [e.line for e in exs] == [1, 2, 3, 4]
    # train_on_prompt trains every token but the first
    (full,) = load_dataset(write_jsonl(tmp_path / "p.jsonl", rows[1:2]), tok, train_on_prompt=True)
    assert full.loss_mask == (False,) + (True,) * (len(full.token_ids) - 1)


def test_shared_datasets(tok):
    alpaca = load_dataset(shared_data("finetune", "alpaca_demo", "alpaca_en_demo.json"), tok)
    assert len(alpaca) == 999 and all(e.num_targets > 0 for e in alpaca)
    assert [e.line for e in alpaca[:2]] == [2, 7]  # records' first lines in the JSON list
    recs = read_records(shared_data("finetune", "gsm8k", "test.jsonl"))
    assert len(recs) == 1319
    path = shared_data("finetune", "gsm8k", "test.jsonl")
    gsm = load_dataset(path, tok, columns={"prompt": "question", "completion": "answer"})
    assert len(gsm) == 1319 and masked_text(tok, gsm[0]).endswith("#### 18" + tok.eos_token)


def test_bad_records_reported_with_line_numbers(tok, tmp_path):
    rows = [
        {"text": "fine"},
        "{not json",
        {"instruction": "x"},  # no output, no other format
        {"instruction": "x", "output": ""},
        {"messages": [{"role": "user", "content": "hi"}]},  # nothing to train on
        "",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        [1, 2],
        {"prompt": 3, "completion": "x"},
        {"text": "a very long record " * 50},
    ]
    with pytest.raises(DataValidationError) as e:
        load_dataset(write_jsonl(tmp_path / "bad.jsonl", rows), tok, max_seq_len=100, truncation="error")
    lines = [n for n, _ in e.value.errors]
    assert lines == [2, 3, 4, 5, 7, 8, 9, 10]
    msg = str(e.value)
    assert "line 2: not valid JSON" in msg and "line 4: field 'output' is empty" in msg
    assert "no assistant message" in msg and "must be a JSON object" in msg and "above max_seq_len=100" in msg
    with pytest.raises(DataValidationError, match="no records"):
        load_dataset(write_jsonl(tmp_path / "empty.jsonl", [""]), tok)
    # a GSM8K-style file without the mapping: the error names the columns that read it, which do
    gsm = [{"question": "1 + 1?", "answer": "2"}, {"question": "2 + 2?", "answer": "4"}]
    with pytest.raises(DataValidationError) as e:
        load_dataset(write_jsonl(tmp_path / "gsm.jsonl", gsm), tok)
    assert "columns={'prompt': 'question', 'completion': 'answer'}" in str(e.value)
    assert len(load_dataset(tmp_path / "gsm.jsonl", tok, columns={"prompt": "question", "completion": "answer"})) == 2


def test_long_records_are_truncated_or_skipped_and_counted(tok, tmp_path):
    """keep_start (default): a long record keeps its first max_seq_len tokens and mask; one whose
    targets all lie past the cut is skipped; both are counted. truncation='error' refuses them."""
    long_answer = " ".join(f"w{i}" for i in range(200))
    rows = [
        {"prompt": "Short?", "completion": "Yes."},
        {"text": long_answer},  # loss on every token: truncated, kept
        {"prompt": long_answer, "completion": "the end"},  # targets only after the cut: skipped
        {"prompt": "Q", "completion": long_answer},  # targets from the start: truncated, kept
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = load_dataset(path, tok)
    data = load_dataset(path, tok, max_seq_len=64)
    assert (data.truncated_lines, data.skipped_lines) == ([2, 4], [3])
    assert (data.truncated_examples, data.skipped_examples) == (2, 1)
    assert [e.line for e in data] == [1, 2, 4]
    for cut in data[1:]:
        whole = next(e for e in full if e.line == cut.line)
        assert len(cut.token_ids) == 64 and cut.token_ids == whole.token_ids[:64] and cut.loss_mask == whole.loss_mask[:64]
    assert data[0] == full[0]
    with pytest.raises(DataValidationError) as e:
        load_dataset(path, tok, max_seq_len=64, truncation="error")
    assert [n for n, _ in e.value.errors] == [2, 3, 4]
    with pytest.raises(ValueError, match="truncation must be one of"):
        load_dataset(path, tok, max_seq_len=64, truncation="keep_end")
