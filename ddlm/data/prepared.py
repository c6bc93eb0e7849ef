"""Read a corpus that `ddlm data prepare` (ddlm.data.prepare) wrote: its index checked, its shards
memory-mapped, its rows cut lazily for any L, each process reading only the rows it asks for.
The format is described in ddlm.data.prepare."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddlm.data.tokenizers import Tokenizer, fingerprint, tokenizer_from_dict
from ddlm.errors import ConfigError, DataError

FORMAT = "ddlm-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
RECENT_SECONDS = 2.0  # a shard modified this recently is always re-hashed (see _verified)


def is_prepared(spec: Any) -> Path | None:
    """The directory a corpus spec names when it is a prepared one ("prepared:DIR", or a directory
    holding index.json), else None."""
    if isinstance(spec, Path):
        return spec if (spec / "index.json").is_file() else None
    if not isinstance(spec, str):
        return None
    if spec.startswith("prepared:"):
        return Path(spec[len("prepared:"):])
    return Path(spec) if spec and (Path(spec) / "index.json").is_file() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def rows_available(index: dict, split: str, seq_len: int, name: str) -> int:
    """Rows of `split` at `seq_len`; DataError (as build_datasets words it) when there are none."""
    entry = index["splits"][split]
    if index["packing"] == "wrap":
        n = entry["tokens"] // seq_len
        if n == 0:
            raise DataError(f"{split} split of corpus '{name}': corpus too small: {entry['tokens']} tokens "
                            f"< one block of {seq_len}")
        return n
    if entry["documents"] == 0:
        raise DataError(f"{split} split of corpus '{name}': no non-empty lines to pad into rows")
    return entry["documents"]


class TokenStream:
    """A split's 1-D token stream over its shard files, each memory-mapped on first use."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths, self.dtype = paths, dtype
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.memmap | None] = [None] * len(paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # a copy maps the files again; it never carries their contents
        return {**self.__dict__, "_maps": [None] * len(self.paths)}

    def _map(self, k: int) -> np.memmap:
        if self._maps[k] is None:
            self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r",
                                      shape=(int(self.starts[k + 1] - self.starts[k]),))
        return self._maps[k]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at `positions` (int64, any shape); only their pages are read."""
        flat = positions.ravel()
        out = np.empty(flat.shape, dtype=self.dtype)
        if len(self.paths) == 1:
            out[:] = self._map(0)[flat]
        elif flat.size:
            shard = np.searchsorted(self.starts, flat, side="right") - 1
            for k in np.unique(shard):
                sel = shard == k
                out[sel] = self._map(int(k))[flat[sel] - self.starts[k]]
        return out.reshape(positions.shape)


class LazyRows:
    """An (N, L) array-like whose indexing (an int, a slice, an int/bool array, optionally with a
    column slice: `rows[idx, :k]`) reads only the rows asked for."""

    ndim = 2

    def __init__(self, n: int, seq_len: int, dtype: np.dtype) -> None:
        self.shape = (n, seq_len)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, rows: np.ndarray) -> np.ndarray:  # (B,) int64 in range -> (B, L)
        raise NotImplementedError

    def _row_index(self, key: Any) -> tuple[np.ndarray, bool]:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return np.array([i], dtype=np.int64), True
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64), False
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean row index of shape {rows.shape} for {n} rows")
            return np.flatnonzero(rows).astype(np.int64), False
        if rows.dtype.kind not in "iu":
            raise IndexError(f"rows must be indexed by integers; got {rows.dtype}")
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        return rows, False

    def __getitem__(self, key: Any) -> np.ndarray:
        cols: Any = slice(None)
        if isinstance(key, tuple):
            if len(key) > 2:
                raise IndexError(f"too many indices for a 2-D array: {len(key)}")
            key, cols = key if len(key) == 2 else (key[0], slice(None))
        rows, scalar = self._row_index(key)
        out = self._rows(rows.ravel()).reshape(*rows.shape, self.shape[1])
        if scalar:
            out = out[0]
        return out[..., cols]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


class WrapRows(LazyRows):
    """Row i = stream[i L : (i + 1) L]."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        super().__init__(len(stream) // seq_len, seq_len, stream.dtype)
        self.stream, self._cols = stream, np.arange(seq_len, dtype=np.int64)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        return self.stream.take(rows[:, None] * self.shape[1] + self._cols)


class NotPad(LazyRows):
    """The valid mask of rows whose padding is written in the stream (aligned wrap): id != pad."""

    def __init__(self, tokens: LazyRows, pad_id: int) -> None:
        super().__init__(*tokens.shape, np.bool_)
        self.tokens, self.pad_id = tokens, pad_id

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        return self.tokens._rows(rows) != self.pad_id


class PadRows(LazyRows):
    """Row r = [BOS] + line r + [EOS] cut to L, padded with pad; line r = stream[off[r]:off[r+1]]."""

    def __init__(self, stream: TokenStream, offsets: np.ndarray, seq_len: int, bos: int, eos: int, pad: int) -> None:
        super().__init__(len(offsets) - 1, seq_len, stream.dtype)
        self.stream, self.offsets, self.ids = stream, offsets, (bos, eos, pad)
        self._cols = np.arange(seq_len - 1, dtype=np.int64)

    def __getstate__(self) -> dict:  # memory-mapped offsets travel as their file's path
        state = dict(self.__dict__)
        if isinstance(self.offsets, np.memmap):
            state["offsets"] = Path(self.offsets.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["offsets"], Path):
            state["offsets"] = np.load(state["offsets"], mmap_mode="r")
        self.__dict__.update(state)

    def lengths(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = np.asarray(self.offsets[rows], dtype=np.int64)
        return starts, np.asarray(self.offsets[rows + 1], dtype=np.int64) - starts

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        bos, eos, pad = self.ids
        seq_len = self.shape[1]
        starts, lengths = self.lengths(rows)
        out = np.full((len(rows), seq_len), pad, dtype=self.dtype)
        out[:, 0] = bos
        body = self._cols < np.minimum(lengths, seq_len - 1)[:, None]
        out[:, 1:][body] = self.stream.take((starts[:, None] + self._cols)[body])
        ended = np.flatnonzero(lengths + 2 <= seq_len)
        out[ended, lengths[ended] + 1] = eos
        return out


class PadValid(LazyRows):
    """The valid mask of PadRows: True on BOS, the line's ids and EOS (within L)."""

    def __init__(self, tokens: PadRows) -> None:
        super().__init__(*tokens.shape, np.bool_)
        self.tokens = tokens
        self._cols = np.arange(tokens.shape[1], dtype=np.int64)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        _, lengths = self.tokens.lengths(rows)
        return self._cols < np.minimum(lengths + 2, self.shape[1])[:, None]


def _verified(path: Path, sha256: str) -> bool:
    """Whether `path` hashes to `sha256`. A match is remembered (in DDLM_CACHE) against the file's
    size and mtime, unless the file changed in the last RECENT_SECONDS (a write in the same clock
    tick would keep its mtime), so a large corpus is hashed once, not at every start."""
    from ddlm import runtime

    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, sha256]
    memo_path = runtime.cache_dir() / "prepared_checks.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError, RecursionError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    if memo.get(key) == stamp:
        return True
    if sha256_file(path) != sha256:
        return False
    if time.time() - st.st_mtime_ns / 1e9 > RECENT_SECONDS:
        memo[key] = stamp
        tmp = memo_path.with_name(f".{memo_path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return True


class PreparedCorpus:
    """A directory written by `prepare_corpus`: its index, tokenizer, streams and datasets."""

    def __init__(self, directory: Path, index: dict) -> None:
        self.directory, self.index = directory, index
        self.packing, self.align = index["packing"], index["align"]
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.fingerprint = index["tokenizer_fingerprint"]
        self.tokenizer_name = index["tokenizer"]["name"]
        self._tokenizer: Tokenizer | None = None

    @property
    def name(self) -> str:
        return f"prepared:{self.directory}"

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the corpus was prepared with, rebuilt from its description."""
        if self._tokenizer is None:
            tok = tokenizer_from_dict(self.index["tokenizer"])
            if fingerprint(tok) != self.fingerprint:
                raise DataError(f"tokenizer of '{self.directory}' rebuilds with fingerprint {fingerprint(tok)}, "
                                f"not the {self.fingerprint} of index.json")
            self._tokenizer = tok
        return self._tokenizer

    def stream(self, split: str) -> TokenStream:
        shards = self.index["splits"][split]["shards"]
        return TokenStream([self.directory / s["file"] for s in shards], [s["tokens"] for s in shards], self.dtype)

    def offsets(self, split: str) -> np.ndarray:
        """Document (wrap) or line (pad) starts of `split`, then its length (memory-mapped if in a file)."""
        entry = self.index["splits"][split]["offsets"]
        if isinstance(entry, list):
            return np.asarray(entry, dtype=np.int64)
        return np.load(self.directory / entry["file"], mmap_mode="r")

    def chars_per_token(self, split: str) -> float:
        entry = self.index["splits"][split]
        return entry["characters"] / max(entry["content_tokens"], 1)

    def dataset(self, split: str, seq_len: int):
        """The split's BlockDataset at `seq_len`, rows read lazily."""
        from ddlm.data.blocks import BlockDataset

        if self.align and seq_len % self.align:
            raise ConfigError(f"'{self.directory}' aligns documents to blocks of {self.align}; data.seq_len "
                              f"{seq_len} must be a multiple of it")
        rows_available(self.index, split, seq_len, self.name)
        tok = self.tokenizer()
        if self.packing == "wrap":
            tokens: LazyRows = WrapRows(self.stream(split), seq_len)
            valid = NotPad(tokens, tok.pad_id) if self.align else None
        else:
            tokens = PadRows(self.stream(split), self.offsets(split), seq_len, tok.bos_id, tok.eos_id, tok.pad_id)
            valid = PadValid(tokens)
        return BlockDataset(tokens, valid, self.chars_per_token(split), self.digest(split))

    def digest(self, split: str) -> str:
        """Identifies the split's token files (each checked against its sha256 when opened)."""
        shards = "".join(str(s["sha256"]) for s in self.index["splits"][split]["shards"])
        return hashlib.sha256(shards.encode()).hexdigest()[:16]

    def datasets(self, seq_len: int) -> dict:
        return {split: self.dataset(split, seq_len) for split in SPLITS}


def _bad(directory: Path, what: str) -> DataError:
    return DataError(f"prepared corpus '{directory}': {what}")


def open_prepared(directory: str | Path, *, verify: bool = True) -> PreparedCorpus:
    """Read DIR/index.json and check every file it names: present, of the right size, and (with
    `verify`) of the recorded sha256; a one-line DataError names the first file that is not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"prepared corpus '{directory}' not found")
    path = directory / "index.json"
    if not path.is_file():
        raise DataError(f"'{directory}' holds no index.json: not a prepared corpus (ddlm data prepare), "
                        f"or an unfinished one")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(directory, f"index.json is not valid JSON ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise _bad(directory, "index.json is nested too deeply to be an index") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise _bad(directory, f"index.json is not a {FORMAT} index")
    if index.get("format_version") != FORMAT_VERSION:
        raise _bad(directory, f"index.json has format version {index.get('format_version')!r}; this ddlm reads "
                              f"version {FORMAT_VERSION}: prepare it again")
    try:
        splits = index["splits"]
        itemsize = np.dtype(index["dtype"]).itemsize
        checks = []
        for split in SPLITS:
            entry = splits[split]
            for shard in entry["shards"]:
                checks.append((shard["file"], shard["tokens"] * itemsize, shard["sha256"]))
            if sum(s["tokens"] for s in entry["shards"]) != entry["tokens"]:
                raise _bad(directory, f"index.json's {split} shards do not add up to its {entry['tokens']} tokens")
            if isinstance(entry["offsets"], dict):
                checks.append((entry["offsets"]["file"], None, entry["offsets"]["sha256"]))
        for key in ("packing", "align", "tokenizer", "tokenizer_fingerprint"):
            index[key]
    except (KeyError, TypeError) as exc:
        raise _bad(directory, f"index.json lacks {exc}") from None
    for name, size, sha in checks:
        file = directory / name
        if not file.is_file():
            raise _bad(directory, f"file '{file}' named in index.json is missing")
        if size is not None and file.stat().st_size != size:
            raise _bad(directory, f"file '{file}' holds {file.stat().st_size} bytes; index.json says {size}")
        if verify and not _verified(file, sha):
            raise _bad(directory, f"file '{file}' does not match its sha256 in index.json (modified or corrupt); "
                                  f"prepare the corpus again")
    return PreparedCorpus(directory, index)


def prepared_datasets(directory: str | Path, data: Any, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, dict]:
    """(tokenizer, {"train", "valid", "test"} BlockDatasets) of a prepared corpus for a run's
    DataConfig `data`. The tokenizer is the index's; the run must name the same one (and the same
    packing), and a tokenizer handed in (a checkpoint's) must be the very same (fingerprint)."""
    corpus = open_prepared(directory)
    wanted = str(data.tokenizer).partition(":")[0]
    if wanted != corpus.tokenizer_name:
        raise ConfigError(f"'{directory}' was prepared with the {corpus.tokenizer_name} tokenizer; set "
                          f"--data.tokenizer={corpus.tokenizer_name} (got {data.tokenizer!r})")
    if data.packing != corpus.packing:
        raise ConfigError(f"'{directory}' was prepared with {corpus.packing} packing; set "
                          f"--data.packing={corpus.packing} (got {data.packing!r})")
    if tokenizer is not None and fingerprint(tokenizer) != corpus.fingerprint:
        raise DataError(f"the run's {tokenizer.name} tokenizer (fingerprint {fingerprint(tokenizer)}) is not the one "
                        f"'{directory}' was prepared with ({corpus.fingerprint})")
    tok = tokenizer if tokenizer is not None else corpus.tokenizer()
    return tok, corpus.datasets(data.seq_len)
