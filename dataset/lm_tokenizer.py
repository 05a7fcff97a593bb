"""Byte-level BPE tokenizer for the HRM language model, built on Hugging Face `tokenizers`.

Byte-level pre-tokenisation (no prefix space) plus the byte-level decoder make `decode(encode(text))`
reproduce `text` exactly, whitespace and newlines included. Our own trained tokenizers put the four
special tokens at fixed ids 0..3; a reused tokenizer.json only has to contain them somewhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dataset.common import DatasetError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3 in trained tokenizers
IGNORE_LABEL_ID = -100  # same value as models.losses.IGNORE_LABEL_ID


class LMDataError(DatasetError):
    """A user-facing, one-line problem with LM data (corpus, tokenizer, prepared dataset). A DatasetError,
    so code that reports puzzle-data errors reports these the same way."""


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                        length: int | None = None, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on an iterator of strings (streamed; never materialised)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise LMDataError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                          f"{len(SPECIAL_TOKENS) + 256} (4 specials + 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


class LMTokenizer:
    """Thin wrapper: special ids as attributes, encode/decode without implicit specials."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        self.tokenizer = tokenizer
        self.source = source
        ids = {}
        for name in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(name)
            if i is None:
                raise LMDataError(f"{source}: tokenizer has no special token {name!r} "
                                  f"(needs {', '.join(SPECIAL_TOKENS)})")
            ids[name] = i
        self.pad_id, self.bos_id = ids[PAD_TOKEN], ids[BOS_TOKEN]
        self.eos_id, self.unk_id = ids[EOS_TOKEN], ids[UNK_TOKEN]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LMTokenizer":
        path = Path(path)
        if not path.is_file():
            raise LMDataError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed JSON
            raise LMDataError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        return cls(tok, source=str(path))

    @classmethod
    def from_dataset(cls, dataset_path: str | os.PathLike) -> "LMTokenizer":
        """Load `<dataset>/tokenizer.json` and check it against `<dataset>/meta.json`."""
        dataset_path = Path(dataset_path)
        tok = cls.from_file(dataset_path / "tokenizer.json")
        meta_path = dataset_path / "meta.json"
        if meta_path.is_file():
            tok.check_against_meta(json.loads(meta_path.read_text()), str(meta_path))
        return tok

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)

    def special_ids(self) -> dict:
        return {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}

    def check_against_meta(self, meta: dict, where: str = "meta.json") -> None:
        """One-line error when a tokenizer and a prepared dataset disagree on vocabulary or specials."""
        if meta.get("vocab_size") != self.vocab_size:
            raise LMDataError(f"{self.source}: tokenizer vocabulary has {self.vocab_size} tokens but {where} "
                              f"says vocab_size={meta.get('vocab_size')}")
        for key, value in self.special_ids().items():
            if key in meta and meta[key] != value:
                raise LMDataError(f"{self.source}: tokenizer has {key}={value} but {where} says {key}={meta[key]}")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Rust-side thread pool: this is where tokenisation runs on all cores.
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental decoding for generation: `push(id)` returns the newly completed text.

    Byte-level BPE may split one UTF-8 character over several tokens; text is only released once the
    bytes decode without a replacement character at the end, so a stream never prints half a character.
    """

    def __init__(self, tok: LMTokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
