"""Incremental detokenization and stop strings for one request.

Text is produced as tokens arrive, for streaming. Decoding token by token is wrong for
byte-level BPE (a character may span tokens) and SentencePiece (leading spaces depend on the
previous token), so each update decodes a short window that starts a few tokens back and emits
only the new suffix, holding back text that ends in an incomplete character (U+FFFD); the
algorithm of ``transformers``' ``TextStreamer`` and vLLM's ``detokenize_incrementally``.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens (leading-space context)


class IncrementalDetokenizer:
    """Text of a request's output tokens, updated a token at a time, with stop-string matching.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        prompt_token_ids: the prompt (its last tokens give context to the first output token).
        stop: stop strings.
        include_stop_str_in_output: keep a matched stop string in the text.
        skip_special_tokens: leave special tokens (e.g. EOS) out of the text.
    """

    def __init__(self, tokenizer, prompt_token_ids, stop=(), include_stop_str_in_output=False, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""
        self.stopped = False
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._streamed = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        """Append one token to :attr:`text` (cut at a matched stop string, after which
        :attr:`stopped` is true and further tokens change nothing)."""
        if self.stopped:
            return
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return  # nothing new yet, or an incomplete character
        self._prefix, self._read = self._read, len(self._ids)
        self._append(new_text[len(prefix_text) :])

    def _append(self, delta: str) -> None:
        before = len(self.text)
        self.text += delta
        if self.stop:
            # A stop string may straddle the old text and the delta.
            search_from = max(0, before - self._holdback)
            hits = [(self.text.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s) if self.include_stop else i]
                self.stopped = True

    def take_delta(self, final: bool = False) -> str:
        """Text not yet handed out. While the request runs, the last ``len(longest stop) - 1``
        characters are held back (they may turn out to start a stop string); ``final`` (or a
        matched stop string) releases everything."""
        end = len(self.text) if (final or self.stopped) else max(self._streamed, len(self.text) - self._holdback)
        delta = self.text[self._streamed : end]
        self._streamed = end
        return delta
