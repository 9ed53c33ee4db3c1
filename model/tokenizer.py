"""Tokenizers: HF `tokenizer.json` through the `tokenizers` package, or a byte-level fallback
(256 byte tokens + BOS/EOS/PAD) for folders without one. Plus incremental detokenization
for streaming, which never emits half a UTF-8 character."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelLoadError


class ByteTokenizer:
    """Token i < 256 is byte i; 256 = BOS, 257 = EOS, 258 = PAD."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path, bos_token_id=None, eos_token_id=None):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path} is not a valid tokenizer.json: {e}") from None
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)


def load_tokenizer(folder: str | Path | None, bos_token_id=None, eos_token_id=None):
    """The folder's tokenizer.json if there is one, else the byte-level tokenizer."""
    if folder is not None:
        f = Path(folder) / "tokenizer.json"
        if f.is_file():
            cfg = Path(folder) / "tokenizer_config.json"
            if cfg.is_file() and bos_token_id is None:
                try:
                    tc = json.loads(cfg.read_text())
                    bos_token_id = tc.get("bos_token_id", bos_token_id)
                except json.JSONDecodeError:
                    pass
            return HFTokenizer(f, bos_token_id, eos_token_id)
    return ByteTokenizer()


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids. Decodes a short window around the new
    tokens (so cost per token stays flat) and holds back output that ends in an incomplete
    character (U+FFFD) until the next token completes it."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix_offset = len(self.ids)
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end, emit whatever was held back (even an incomplete character)."""
        full = self.tok.decode(self.ids[self.prefix_offset:])
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.read_offset = self.prefix_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops, start: int = 0) -> int:
    """Index where the first stop string begins in text[start:] (searching a little before
    `start` so a stop split across deltas is found); -1 if none."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best
