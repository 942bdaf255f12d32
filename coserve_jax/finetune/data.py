"""Finetuning data: JSONL / JSON records in the formats users have, tokenized with a loss mask.

Formats, recognised per record by its keys:

* ``{"text": ...}``: plain text; loss on every token (causal LM pretraining style).
* Alpaca ``{"instruction", "input" (optional), "output"}``: rendered with the Stanford Alpaca
  prompt (``ALPACA_PROMPT`` / ``ALPACA_PROMPT_NO_INPUT``); loss on the output only.
* Prompt-completion ``{"prompt", "completion"}`` (TRL / OpenAI legacy); loss on the completion.
  ``columns={"prompt": "question", "completion": "answer"}`` maps other names (e.g. GSM8K).
* Chat ``{"messages": [{"role", "content"}, ...]}`` (OpenAI's fine-tuning format), rendered with the
  tokenizer's chat template; loss on the assistant messages only.

``chat_template=True`` renders Alpaca and prompt-completion records as a one-turn conversation
(the prompt as the user message, the completion as the assistant's) through the chat template,
as TRL does for conversational prompt-completion data, so a chat model is tuned in the form it
is served in. ``train_on_prompt=True`` puts the loss on every token instead. Completion-style records get the
tokenizer's EOS appended (so the model learns to stop), as TRL's SFT does.

Every record is checked before any training starts; all problems are reported at once with the
file's line numbers (:class:`DataValidationError`).

**Long records** are truncated to ``max_seq_len`` tokens, keeping the start (``truncation=
"keep_start"``, what OpenAI's fine-tuning and TRL's ``max_length`` do), and counted; a record left
with no trainable token is skipped and counted. ``truncation="error"`` makes a long record an
error instead. The counts ride on the returned :class:`TrainingSet`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ROLES = ("system", "user", "assistant", "developer", "tool")


class DataValidationError(ValueError):
    """Bad training records. ``errors`` lists ``(line, message)``; the message names each."""

    def __init__(self, path: str, errors: Sequence[tuple[int, str]]):
        self.path = path
        self.errors = list(errors)
        shown = "; ".join(f"line {n}: {m}" for n, m in self.errors[:10])
        more = f" (and {len(self.errors) - 10} more)" if len(self.errors) > 10 else ""
        super().__init__(f"{path}: {len(self.errors)} bad record(s): {shown}{more}")


@dataclasses.dataclass(frozen=True)
class TrainingExample:
    """One tokenized training sequence.

    Attributes:
        token_ids: the sequence, int token ids.
        loss_mask: per token, whether it is a training target (predicted from the tokens before
            it); ``loss_mask[0]`` is always false.
        line: the record's line in its file.
    """

    token_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    line: int

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


TRUNCATION_MODES = ("keep_start", "error")
"""What a record longer than ``max_seq_len`` does: ``keep_start`` (truncated, as TRL's
``truncation_mode``), or ``error`` (the file is rejected)."""


class TrainingSet(list):
    """The examples of a file (a ``list`` of :class:`TrainingExample`), with how it was read.

    Attributes:
        truncated_lines: lines of the records cut to ``max_seq_len`` tokens (kept).
        skipped_lines: lines of the records left out because truncation removed every target token.
    """

    def __init__(self, examples=(), truncated_lines=(), skipped_lines=()):
        super().__init__(examples)
        self.truncated_lines = list(truncated_lines)
        self.skipped_lines = list(skipped_lines)

    @property
    def truncated_examples(self) -> int:
        """Records truncated (and kept)."""
        return len(self.truncated_lines)

    @property
    def skipped_examples(self) -> int:
        """Records skipped (no target token left after truncation)."""
        return len(self.skipped_lines)


def truncate_examples(
    examples, max_seq_len: int, truncation: str = "keep_start", where: str = "examples"
) -> TrainingSet:
    """Fit examples to ``max_seq_len`` tokens (see the module docstring).

    Raises:
        ValueError: an unknown ``truncation``.
        DataValidationError: ``truncation="error"`` and examples that are too long (their lines
            named), or no example left.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    out, truncated, skipped, errors = [], [], [], []
    for ex in examples:
        if len(ex.token_ids) <= max_seq_len:
            out.append(ex)
            continue
        if truncation == "error":
            errors.append((ex.line, f"{len(ex.token_ids)} tokens, above max_seq_len={max_seq_len} (truncation='error')"))
            continue
        cut = TrainingExample(ex.token_ids[:max_seq_len], ex.loss_mask[:max_seq_len], ex.line)
        if max_seq_len < 2 or not cut.num_targets:
            skipped.append(ex.line)
        else:
            truncated.append(ex.line)
            out.append(cut)
    if errors:
        raise DataValidationError(where, errors)
    if not out:
        raise DataValidationError(where, [(skipped[0] if skipped else 1, f"no record has a token to train on within max_seq_len={max_seq_len}")])
    return TrainingSet(out, truncated, skipped)


def read_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line, record)`` pairs of a ``.jsonl`` file (one JSON value per non-blank line) or a
    ``.json`` file holding a list. Unparsable lines become ``(line, DataValidationError)`` entries
    rather than exceptions, so that all problems can be reported together.

    Raises:
        FileNotFoundError: no such file.
        DataValidationError: a ``.json`` file that is not a JSON list.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.endswith(".json") or stripped.startswith("["):
        return _read_json_list(path, text)
    out: list[tuple[int, Any]] = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, DataValidationError(path, [(i, f"not valid JSON ({e.msg} at column {e.colno})")])))
    return out


def _read_json_list(path: str, text: str) -> list[tuple[int, Any]]:
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:].startswith("["):
        raise DataValidationError(path, [(1, "a .json training file must hold a list of records")])
    i += 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DataValidationError(path, [(text.count("\n") + 1, "unterminated JSON list")])
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataValidationError(path, [(e.lineno, f"not valid JSON ({e.msg})")]) from None
        out.append((line, obj))


def record_format(rec: Any, columns: Mapping[str, str] | None = None) -> str:
    """``"text"``, ``"alpaca"``, ``"prompt_completion"`` or ``"messages"``.

    Raises:
        ValueError: not an object, or keys of none of the formats.
    """
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    cols = {"prompt": "prompt", "completion": "completion", **(columns or {})}
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if cols["prompt"] in rec and cols["completion"] in rec:
        return "prompt_completion"
    if "text" in rec:
        return "text"
    keys = list(rec)  # (in the record's order: a two-field record is likely prompt, then completion)
    hint = (f"columns={{'prompt': '{keys[0]}', 'completion': '{keys[1]}'}}" if len(keys) == 2
            else "columns={'prompt': <field>, 'completion': <field>}")
    raise ValueError(
        f"unknown record format (keys {sorted(keys)}): expected 'text', 'messages', "
        f"'instruction'+'output', or '{cols['prompt']}'+'{cols['completion']}'; for other field names set "
        f"the job's {hint} (a hyperparameter of the fine-tuning job, FinetuneConfig.columns in Python)"
    )


def _str_field(rec: Mapping, key: str, allow_empty: bool = False) -> str:
    v = rec.get(key, "" if allow_empty else None)
    if not isinstance(v, str):
        raise ValueError(f"field '{key}' must be a string, got {type(v).__name__ if key in rec else 'nothing'}")
    if not allow_empty and not v.strip():
        raise ValueError(f"field '{key}' is empty")
    return v


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _prompt_completion(tokenizer, prompt: str, completion: str, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    p = _encode(tokenizer, prompt, True)
    c = _encode(tokenizer, completion, False)
    if tokenizer.eos_token_id is not None:
        c.append(int(tokenizer.eos_token_id))
    ids = p + c
    mask = [train_on_prompt] * len(p) + [True] * len(c)
    return ids, mask


def _chat(tokenizer, messages: Any, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{j}] must be {{'role': one of {list(ROLES)}, 'content': string}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'messages' has no assistant message to train on")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat records need a tokenizer with a chat template")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    spans = []  # character spans of the assistant turns in the full rendering
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:j], True) if j else ""
        end = render(messages[: j + 1], False)
        if not (full.startswith(start) and full.startswith(end)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot mask the prompt")
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [train_on_prompt or any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc["offset_mapping"]]
    return ids, mask


def tokenize_record(
    rec: Any,
    tokenizer,
    *,
    train_on_prompt: bool = False,
    columns: Mapping[str, str] | None = None,
    line: int = 0,
    chat_template: bool = False,
) -> TrainingExample:
    """One record -> :class:`TrainingExample` (format from :func:`record_format`; see the module
    docstring for ``chat_template``).

    Raises:
        ValueError: a malformed record (the message names the field).
    """
    fmt = record_format(rec, columns)
    cols = {"prompt": "prompt", "completion": "completion", **(columns or {})}
    if fmt == "text":
        ids = _encode(tokenizer, _str_field(rec, "text"), True)
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        mask = [True] * len(ids)
    elif fmt in ("alpaca", "prompt_completion"):
        if fmt == "alpaca":
            instruction, inp = _str_field(rec, "instruction"), _str_field(rec, "input", allow_empty=True)
            if chat_template:
                prompt = instruction + (f"\n\n{inp}" if inp.strip() else "")
            else:
                prompt = (ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=inp)
            completion = _str_field(rec, "output")
        else:
            prompt, completion = _str_field(rec, cols["prompt"]), _str_field(rec, cols["completion"])
        if chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids, mask = _chat(tokenizer, msgs, train_on_prompt)
        else:
            ids, mask = _prompt_completion(tokenizer, prompt, completion, train_on_prompt)
    else:
        ids, mask = _chat(tokenizer, rec["messages"], train_on_prompt)
    mask[0] = False  # the first token has nothing to be predicted from
    if len(ids) < 2 or not any(mask):
        raise ValueError("the record has no token to train on")
    return TrainingExample(tuple(ids), tuple(mask), line)


def load_dataset(
    path: str | os.PathLike,
    tokenizer,
    *,
    train_on_prompt: bool = False,
    columns: Mapping[str, str] | None = None,
    max_seq_len: int | None = None,
    chat_template: bool = False,
    truncation: str = "keep_start",
) -> TrainingSet:
    """Read, validate and tokenize a whole training file.

    Args:
        path: ``.jsonl`` or ``.json`` file.
        tokenizer: a ``transformers`` tokenizer (with a chat template for chat records).
        train_on_prompt: loss on prompt tokens too.
        columns: field names for prompt-completion records, e.g. ``{"prompt": "question",
            "completion": "answer"}``.
        max_seq_len: longest sequence, in tokens (longer records are truncated or refused, as
            ``truncation`` says).
        chat_template: render Alpaca / prompt-completion records as a user / assistant
            conversation with the tokenizer's chat template.
        truncation: ``"keep_start"`` or ``"error"`` (see the module docstring).
    Returns:
        A :class:`TrainingSet`: one :class:`TrainingExample` per kept record, in file order,
        with the lines of the truncated and skipped records.
    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown ``truncation``.
        DataValidationError: every bad record with its line number; nothing is returned.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    errors: list[tuple[int, str]] = []
    out: list[TrainingExample] = []
    records = read_records(path)
    if not records:
        raise DataValidationError(os.fspath(path), [(1, "the file holds no records")])
    for line, rec in records:
        if isinstance(rec, DataValidationError):
            errors.extend(rec.errors)
            continue
        try:
            ex = tokenize_record(
                rec, tokenizer, train_on_prompt=train_on_prompt, columns=columns, line=line, chat_template=chat_template
            )
        except ValueError as e:
            errors.append((line, str(e)))
            continue
        if truncation == "error" and max_seq_len is not None and len(ex.token_ids) > max_seq_len:
            errors.append((line, f"{len(ex.token_ids)} tokens, above max_seq_len={max_seq_len} (truncation='error')"))
            continue
        out.append(ex)
    if errors:
        raise DataValidationError(os.fspath(path), errors)
    if max_seq_len is None:
        return TrainingSet(out)
    return truncate_examples(out, max_seq_len, truncation, os.fspath(path))
