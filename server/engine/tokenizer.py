"""The serving tokenizer behind one lock.

Request threads tokenize (make_sequence), the engine thread detokenizes and HTTP threads decode for logprobs, all
at once; a Hugging Face fast tokenizer used from two threads at the same time fails ("Already borrowed").
"""

from __future__ import annotations

import threading

from prompt_core.layout import encode


class SharedTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # hold it to call `tokenizer` directly (e.g. plan_row)

    def encode(self, text: str) -> list[int]:
        """The text's tokens, without the special tokens the tokenizer adds in front."""
        with self.lock:
            return encode(self.tokenizer, text)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens as written), for log-probability listings."""
        with self.lock:
            return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
