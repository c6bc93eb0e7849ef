"""Token streams, fixed-length blocks, and a deterministic resumable batch loader."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddlm.data.corpora import Corpus
from ddlm.data.tokenizers import Tokenizer, fingerprint, iter_chunks, special_ids
from ddlm.errors import CheckpointError, ConfigError, DataError

PACKINGS = ("pad", "wrap")
_CHUNK_CHARS = 1_000_000  # encode long documents in pieces of about this many chars


def stream_dtype(tok: Tokenizer) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer; got {seq_len!r}")


def _encode_stream(tok: Tokenizer, docs: list[str], add_bos_between: bool) -> np.ndarray:
    """Concatenated ids of the non-empty documents, each followed by bos when asked."""
    dtype = stream_dtype(tok)
    parts: list[np.ndarray] = []
    eos = np.array([tok.bos_id], dtype=dtype)
    for doc in docs:
        # normalize() is idempotent and local, so encoding pieces of the normalised
        # text gives the same ids as encoding the whole document.
        norm = tok.normalize(doc)
        if not norm:
            continue
        for piece in iter_chunks(norm, _CHUNK_CHARS):
            parts.append(np.asarray(tok.encode(piece), dtype=dtype))
        if add_bos_between:
            parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _docs_digest(docs: list[str], add_bos_between: bool) -> str:
    """sha256 (first 16 hex) of the documents and the bos flag."""
    h = hashlib.sha256(b"bos=1;" if add_bos_between else b"bos=0;")
    for doc in docs:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file in the same folder, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write token cache '{path}': {exc.strerror or exc}") from None


def _load_cached(path: Path, dtype: np.dtype, vocab_size: int) -> np.ndarray | None:
    """The memory-mapped cached stream at `path`, or None if absent or unusable: not a 1-D array
    of `dtype`, or holding an id past the vocabulary (which would index past the embedding)."""
    if not path.is_file():
        return None
    try:
        stream = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if stream.ndim != 1 or stream.dtype != dtype:
        return None
    return stream if len(stream) == 0 or int(stream.max()) < vocab_size else None


def encode_documents(
    tok: Tokenizer, docs: list[str], *, cache_dir: str | Path | None = None, add_bos_between: bool = True
) -> np.ndarray:
    """1-D token stream of `docs` (empty ones skipped), each followed by bos (EOS) when asked.

    With `cache_dir`, the stream is cached there as a .npy keyed by the tokenizer
    fingerprint and the documents' digest, and returned memory-mapped.
    """
    if cache_dir is None:
        return _encode_stream(tok, docs, add_bos_between)
    name = f"stream-{tok.name}-{fingerprint(tok)}-{_docs_digest(docs, add_bos_between)}.npy"
    path = Path(cache_dir) / name
    cached = _load_cached(path, stream_dtype(tok), tok.vocab_size)
    if cached is not None:
        return cached
    _save_npy_atomic(path, _encode_stream(tok, docs, add_bos_between))
    return np.load(path, mmap_mode="r")


def wrap_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, L) view of consecutive non-overlapping blocks of `stream`; the remainder is dropped."""
    _check_seq_len(seq_len)
    if stream.ndim != 1:
        raise DataError(f"token stream must be 1-D; got shape {tuple(stream.shape)}")
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"corpus too small: {len(stream)} tokens < one block of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def _line_rows(tok: Tokenizer, docs: list[str]) -> tuple[list[list[int]], int]:
    """Ids of every non-blank line of `docs`, and the total normalised chars of those lines."""
    rows: list[list[int]] = []
    n_chars = 0
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                rows.append(tok.encode(line))
                n_chars += len(tok.normalize(line))
    return rows, n_chars


def _pad_rows(tok: Tokenizer, rows: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) tokens [BOS] + ids + [EOS] truncated and padded, and their (N, L) valid mask."""
    _check_seq_len(seq_len)
    if not rows:
        raise DataError("no non-empty lines to pad into rows")
    tokens = np.full((len(rows), seq_len), tok.pad_id, dtype=stream_dtype(tok))
    valid = np.zeros((len(rows), seq_len), dtype=bool)
    for r, ids in enumerate(rows):
        seq = [tok.bos_id, *ids, tok.eos_id][:seq_len]
        tokens[r, : len(seq)] = seq
        valid[r, : len(seq)] = True
    return tokens, valid


def pad_documents(tok: Tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """LM1B style: one row per non-blank line, [BOS] + ids + [EOS] truncated to L, padded with pad_id.

    Returns (tokens (N, L), valid (N, L) bool, True for real tokens incl. BOS/EOS).
    """
    rows, _ = _line_rows(tok, docs)
    return _pad_rows(tok, rows, seq_len)


@dataclass
class BlockDataset:
    """Fixed-length rows of token ids with an optional validity mask."""

    tokens: np.ndarray  # (N, L)
    valid: np.ndarray | None  # (N, L) bool, or None when every token is real
    chars_per_token: float  # normalised chars per non-special token, for BPC
    digest: str = ""  # identifies the text (or token files) the rows come from; "" when unknown

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise DataError(f"block tokens must be 2-D (N, L); got shape {tuple(self.tokens.shape)}")
        if self.valid is not None and self.valid.shape != self.tokens.shape:
            raise DataError(f"valid mask shape {tuple(self.valid.shape)} != tokens shape {tuple(self.tokens.shape)}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


@dataclass
class Batch:
    """One batch of rows."""

    tokens: torch.Tensor  # (B, L) int64
    mask: torch.Tensor | None  # (B, L) bool, True = real token; None when all real


class BlockLoader:
    """Deterministic, resumable batches over a BlockDataset.

    Epoch e visits rows in the order np.random.default_rng((seed, e)).permutation(N)
    (shuffle=False: 0..N-1). That order is cut into consecutive slices of
    batch_size rows; slice k belongs to rank k % world_size, so rank r's i-th
    batch of an epoch is slice i * world_size + r. With drop_last every rank gets
    N // (batch_size * world_size) full batches per epoch (use this for DDP
    training); without it the last slice may be short and ranks may differ by one batch.
    """

    def __init__(
        self,
        ds: BlockDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for arg, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{arg} must be an integer >= {low}; got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"rank must be < world_size ({world_size}); got {rank}")
        self.ds, self.batch_size, self.seed, self.shuffle = ds, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.batches_per_epoch = self.count_batches(drop_last)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"dataset of {len(ds)} blocks gives rank {rank} no batch of {batch_size} "
                f"(world_size {world_size}, drop_last {drop_last})"
            )
        self.epoch = 0
        self.index = 0  # next batch of this rank within the epoch
        self._order_cache: tuple[int, np.ndarray] | None = None

    def count_batches(self, drop_last: bool) -> int:
        """Batches this rank gets per epoch."""
        n, b, w = len(self.ds), self.batch_size, self.world_size
        if drop_last:
            return n // (b * w)
        n_slices = -(-n // b)
        return max(0, -(-(n_slices - self.rank) // w))

    def _order(self, epoch: int) -> np.ndarray:
        """Row order of `epoch`."""
        if not self.shuffle:
            return np.arange(len(self.ds))
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.ds)))
        return self._order_cache[1]

    def _batch(self, order: np.ndarray, i: int) -> Batch:
        """This rank's i-th batch of an epoch with row order `order`."""
        k = i * self.world_size + self.rank
        return self.take(order[k * self.batch_size : (k + 1) * self.batch_size])

    def take(self, rows: np.ndarray) -> Batch:
        """The batch of dataset rows `rows` (only those rows are read from a memory-mapped set)."""
        tokens = torch.from_numpy(np.asarray(self.ds.tokens[rows], dtype=np.int64))
        mask = None if self.ds.valid is None else torch.from_numpy(np.asarray(self.ds.valid[rows], dtype=bool))
        return Batch(tokens, mask)

    def next_rows(self) -> np.ndarray:
        """Row indices of this rank's next batch of the infinite stream across epochs; advances the
        state. A trainer that splits one global batch over processes builds the loader as a world
        of one with the global batch size and gives each process its part of these rows."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        k = self.index * self.world_size + self.rank
        self.index += 1
        return self._order(self.epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def next_batch(self) -> Batch:
        """Next batch of the infinite stream across epochs; advances the state."""
        return self.take(self.next_rows())

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def epoch_batches(self) -> Iterator[Batch]:
        """One unshuffled pass over every row of this rank's shard (last batch may be short); state untouched."""
        order = np.arange(len(self.ds))
        for i in range(self.count_batches(drop_last=False)):
            yield self._batch(order, i)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, d: dict) -> None:
        """Resume from `state_dict()` output; later batches equal those of an uninterrupted loader."""
        if not isinstance(d, dict):
            raise CheckpointError(f"loader state must be a dict with 'epoch' and 'index'; got {type(d).__name__}")
        values = [d.get(key) for key in ("epoch", "index")]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise CheckpointError(f"loader state needs non-negative integers 'epoch' and 'index'; got {d!r}")
        if values[1] > self.batches_per_epoch:
            raise CheckpointError(
                f"loader state index {values[1]} exceeds the {self.batches_per_epoch} batches per epoch of this loader"
            )
        self.epoch, self.index = values


def _non_special_count(tok: Tokenizer, tokens: np.ndarray) -> int:
    """Number of entries of `tokens` that are not bos/mask/pad."""
    return int(tokens.size - np.isin(tokens, special_ids(tok)).sum())


def _split_dataset(
    tok: Tokenizer, docs: list[str], seq_len: int, packing: str, cache_dir: str | Path | None
) -> BlockDataset:
    """BlockDataset of one split's documents."""
    digest = _docs_digest(docs, False)
    if packing == "wrap":
        stream = encode_documents(tok, docs, cache_dir=cache_dir)
        n_chars = sum(len(tok.normalize(d)) for d in docs)
        n_tokens = _non_special_count(tok, stream)
        blocks = wrap_blocks(stream, seq_len)
        return BlockDataset(blocks, None, n_chars / max(n_tokens, 1), digest)
    rows, n_chars = _line_rows(tok, docs)
    tokens, valid = _pad_rows(tok, rows, seq_len)
    return BlockDataset(tokens, valid, n_chars / max(sum(len(r) for r in rows), 1), digest)


def build_datasets(
    corpus: Corpus, tok: Tokenizer, *, seq_len: int, packing: str = "wrap", cache_dir: str | Path | None = None
) -> dict[str, BlockDataset]:
    """Datasets "train", "valid", "test" of `corpus`, packed "wrap" (contiguous blocks) or "pad" (a line per row)."""
    if packing not in PACKINGS:
        raise ConfigError(f"unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")
    _check_seq_len(seq_len)
    out: dict[str, BlockDataset] = {}
    for split in ("train", "valid", "test"):
        try:
            out[split] = _split_dataset(tok, corpus.split(split), seq_len, packing, cache_dir)
        except DataError as exc:
            raise DataError(f"{split} split of corpus '{corpus.name}': {exc}") from None
    return out
