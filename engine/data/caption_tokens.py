"""Caption length in text-encoder tokens: a quick estimate, or the real count from a tokenizer folder.

UMT5 reads at most 512 tokens (end-of-sequence included) and cuts the rest. The doctor warns before that
happens; without a tokenizer it uses an estimate that errs on the long side.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """A generous stand-in for the UMT5 token count (plus end-of-sequence) when no tokenizer is loaded.

    SentencePiece keeps common English words whole; counting one token per 4 ASCII letters, one per digit,
    symbol or non-ASCII character errs on the long side, which is the safe side for a warning.
    """
    n = 0
    for m in _PIECE.finditer(text):
        s = m.group()
        n += math.ceil(len(s) / 4) if s.isascii() and s.isalpha() else len(s)
    return n + 1


class TokenizerCounter:
    """Exact token counts (end-of-sequence included) from a tokenizer folder, e.g. `<model>/tokenizer`.

    Picklable, so the doctor's worker processes can use it: each process loads the tokenizer once, lazily
    (transformers is imported only then).
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"tokenizer folder {self.folder} does not exist: pass the model's tokenizer/ folder")
        self._tokenizer = None

    def __call__(self, text: str) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        return len(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_tokenizer": None}
