"""Tokenizer and chat template of a checkpoint, through ``transformers.AutoTokenizer``, offline.

We do not reimplement tokenization: ``AutoTokenizer`` (Rust ``tokenizers`` underneath) loads the
``tokenizer.json`` / ``tokenizer_config.json`` of the checkpoint directory or of a separate
tokenizer directory, and its ``apply_chat_template`` renders conversations with the template the
checkpoint ships (Jinja, the same code path ``transformers`` users run). Nothing is fetched from a
hub: ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

log = logging.getLogger("coserve_jax.engine")


def load_tokenizer(
    path: str | os.PathLike, chat_template: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local checkpoint or tokenizer directory, or of a GGUF file.

    Args:
        path: a directory holding ``tokenizer.json`` (and usually ``tokenizer_config.json``), or
            a llama.cpp ``.gguf`` file whose metadata holds the tokenizer and chat template
            (converted by ``transformers``: ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``).
        chat_template: optional override: a Jinja template string, or the path of a ``.jinja`` file
            (e.g. a template from the model card when the checkpoint has none).
        cache_dir: where a GGUF file's converted tokenizer is kept (``save_pretrained``), keyed
            by the file (path, size, modification time) and the ``transformers`` and
            ``tokenizers`` versions: converting SmolLM2's 49k-token vocabulary parses the file's
            metadata twice in Python (about 8 s on a 2-core CPU), loading the saved one does not.
            ``None``: convert every time.
    Returns:
        A ``transformers`` tokenizer (``PreTrainedTokenizerFast`` or the backend class of the
        installed ``transformers``).
    Raises:
        FileNotFoundError: ``path`` is not a directory or GGUF file, or holds no tokenizer.
        ValueError: a GGUF tokenizer ``transformers`` cannot convert.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return _with_template(_gguf_tokenizer(path, cache_dir), chat_template)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    known = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in known):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(known)}) in {path!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _with_template(tokenizer, chat_template)


def _gguf_tokenizer(path: str, cache_dir: str | os.PathLike | None) -> PreTrainedTokenizerBase:
    """A GGUF file's tokenizer, converted by ``transformers`` or loaded from ``cache_dir``."""
    saved = None
    if cache_dir is not None:
        import hashlib

        import tokenizers
        import transformers

        st = os.stat(path)
        ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|{tokenizers.__version__}"
        saved = os.path.join(os.fspath(cache_dir), hashlib.sha256(ident.encode()).hexdigest()[:32])
        if os.path.isfile(os.path.join(saved, "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(saved, local_files_only=True)
            except Exception as e:  # a damaged entry: convert again
                log.warning("cached tokenizer %s did not load (%s: %s); converting %s again", saved, type(e).__name__, e, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), local_files_only=True
        )
    except (KeyError, NotImplementedError) as e:  # transformers' converter names what it lacks
        raise ValueError(f"cannot convert the tokenizer of {os.path.basename(path)}: {type(e).__name__}: {e}") from None
    if saved is not None:
        import shutil
        import tempfile

        try:  # written beside, then renamed into place: readers see a whole entry or none
            os.makedirs(os.path.dirname(saved), exist_ok=True)
            tmp = tempfile.mkdtemp(dir=os.path.dirname(saved), prefix=".tmp-")
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, saved)
            except OSError:  # another process saved it first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            log.warning("could not cache the tokenizer of %s (%s)", path, e)
    return tokenizer


def _with_template(tokenizer: PreTrainedTokenizerBase, chat_template) -> PreTrainedTokenizerBase:
    if chat_template is not None:
        text = os.fspath(chat_template)
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        tokenizer.chat_template = text
    return tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render an OpenAI-style conversation (``[{"role": ..., "content": ...}, ...]``) to a prompt.

    Args:
        add_generation_prompt: end with the assistant header, ready for generation.
        template_kwargs: passed to the template (e.g. ``date_string`` for Llama 3.1, ``tools``).
    Raises:
        ValueError: the tokenizer has no chat template (pass one to :func:`load_tokenizer`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass chat_template= to load_tokenizer")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], **kwargs: Any
) -> list[int]:
    """Token ids of :func:`render_chat`'s prompt (special tokens come from the template itself)."""
    return tokenizer.encode(render_chat(tokenizer, messages, **kwargs), add_special_tokens=False)
