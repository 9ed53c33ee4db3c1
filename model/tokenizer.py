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

    special_tokens = {"bos_token": "", "eos_token": ""}
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True, *, add_bos: bool | None = None) -> list[int]:
        if add_bos is not None:
            add_special_tokens = add_bos
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json), encoding as transformers does: special tokens
    come from the tokenizer's own post-processor (Llama 3 adds <|begin_of_text|>, Qwen2 adds
    nothing), and an explicit add_bos_token / add_eos_token in tokenizer_config.json wins
    (Llama 2 style). Only a bare tokenizer.json with no config gets config.json's BOS prepended."""

    def __init__(self, path: Path, bos_token_id=None, eos_token_id=None, config: dict | None = None):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path} is not a valid tokenizer.json: {e}") from None
        self.config = config or {}
        self.special_tokens: dict[str, str] = {}     # bos_token, eos_token, ... -> text (chat templates)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tok = _token_str(self.config.get(name))
            if tok is not None:
                self.special_tokens[name] = tok
        self.bos_token_id = self._id_of("bos_token", bos_token_id)
        self.eos_token_id = self._id_of("eos_token", eos_token_id)
        self.vocab_size = self._tok.get_vocab_size()
        self.add_bos = self.config.get("add_bos_token")
        self.add_eos = self.config.get("add_eos_token")
        if config is None:            # a bare tokenizer.json: the old convention, BOS from config.json
            self.add_bos = True if bos_token_id is not None else None
        self.chat_template = None

    def _id_of(self, name: str, fallback):
        tok = self.special_tokens.get(name)
        if tok is not None and self._tok.token_to_id(tok) is not None:
            return self._tok.token_to_id(tok)
        if name in self.config and self.config[name] is None:
            return None                       # e.g. Qwen2: bos_token null
        return fallback

    def encode(self, text: str, add_special_tokens: bool = True, *, add_bos: bool | None = None) -> list[int]:
        """add_special_tokens=False for text that already holds them (a rendered chat prompt)."""
        if add_bos is not None:
            add_special_tokens = add_bos
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self.eos_token_id
        if self.add_bos is True and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        elif self.add_bos is False and bos is not None and ids[:1] == [bos]:
            ids = ids[1:]
        if self.add_eos is True and eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(folder: str | Path | None, bos_token_id=None, eos_token_id=None):
    """The folder's tokenizer.json (with tokenizer_config.json and its chat template) if there
    is one, else the byte-level tokenizer."""
    if folder is not None:
        f = Path(folder) / "tokenizer.json"
        if f.is_file():
            cfg_file = Path(folder) / "tokenizer_config.json"
            config = None
            if cfg_file.is_file():
                try:
                    config = json.loads(cfg_file.read_text())
                except json.JSONDecodeError as e:
                    raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
            tok = HFTokenizer(f, bos_token_id, eos_token_id, config)
            from model.chat_template import load_chat_template
            tok.chat_template = load_chat_template(Path(folder), config or {})
            return tok
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
