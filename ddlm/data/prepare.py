"""Tokenize a corpus once, in parallel, into sharded memory-mapped token files (read back by ddlm.data.prepared).

`prepare_corpus(SOURCE, TOKENIZER, DIR)` (the `ddlm data prepare` command) writes

    DIR/index.json               format, ddlm version, source, the tokenizer's description and its
                                 fingerprint, dtype, packing; per split: its shards (file, tokens,
                                 sha256), document offsets, tokens, content tokens and characters
    DIR/{split}_{k:05d}.bin      raw little-endian ids, uint16 when the vocabulary fits, else uint32
    DIR/{split}_offsets.npy      int64 offsets (see below) when there are more than OFFSETS_INLINE
                                 of them; fewer are written inline in index.json

What a split's token stream holds:

- wrap: every document whose normalised text is not empty: its ids, then EOS (the bos id), then,
  with `align=B`, pad ids up to the next multiple of B (BD3-LM style: every document starts at a
  multiple of B; pad positions are invalid in the rows' mask). Rows are consecutive L-token slices
  of the stream; the remainder is dropped. Offsets: each document's first token.
- pad: the ids of every non-blank line, nothing between them. Row r is [BOS] + line r + [EOS],
  cut to L and padded, with its valid mask. Offsets: each line's first token.

Offsets end with the stream's length. Rows are cut when read (`open_prepared(DIR).datasets(L)`), so
one prepared DIR serves any L, and give exactly the rows of `blocks.build_datasets` on the same
corpus, tokenizer, L and packing. Chars-per-token for BPC is characters / content tokens.

How the work flows, in constant memory whatever the corpus's size: the source is read as a stream
of documents (text files in blocks, decoded incrementally; hf datasets row batch by row batch);
each document is cut into chunks of about `chunk_chars` characters where no pre-token of any
tokenizer is split (between a letter and " letter"; pad packing after a newline; a window of
`chunk_chars` with no such place, as in unspaced CJK text, is cut at its start); chunks are
grouped into jobs, tokenized by `workers` processes with a bounded number of jobs in flight, and
their ids appended in order to the current shard. The result never depends on the number of
workers. Everything is written to a temporary directory beside DIR and renamed into place at the
end, so an interrupted prepare leaves no DIR (and the next prepare removes its leftovers).

Text files follow `load_corpus`'s rules (90/5/5 by characters at the nearest line boundary; text8
90/5/5 without line snapping): a first pass counts the characters, a second finds the line ends
nearest the cuts, the third tokenizes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from ddlm.data.corpora import TEXT8_URL, Corpus, check_text_file, hf_text_column, load_corpus, open_hf, pick_cut
from ddlm.data.tokenizers import (
    BPETokenizer,
    Tokenizer,
    build_tokenizer,
    canonical_json,
    fingerprint,
    tokenizer_from_dict,
)
from ddlm.data.prepared import FORMAT, FORMAT_VERSION, SPLITS, rows_available, sha256_file, is_prepared
from ddlm.errors import ConfigError, DataError

PACKINGS = ("pad", "wrap")
CHUNK_CHARS = 1 << 20  # characters per tokenizer chunk (and per job, at least)
SHARD_TOKENS = 100_000_000
OFFSETS_INLINE = 1024  # more offsets than this go to a .npy beside the shards
READ_BYTES = 1 << 22
SCAN_BAR_BYTES = 1 << 28  # files larger than this show bars for their two scans

# A cut between a letter and " letter" splits no pre-token of the GPT-2 / cl100k / BERT / ByteLevel
# pre-tokenizers and no run that char normalisation collapses.
_WRAP_CUT = re.compile(r"(?<=[A-Za-z])(?= [A-Za-z])")


def token_dtype(tok: Tokenizer) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65535), else uint32 (as
    `blocks.stream_dtype`, with the byte order fixed for the files)."""
    return np.dtype("<u2" if tok.vocab_size <= 65535 else "<u4")


# -- sources: a flat stream of events ----------------------------------------------------------
# ("begin_split", name), ("begin_doc",), ("text", str), ("end_doc",), ("end_split",)


def _decoded_blocks(path: Path, what: str, on_bytes=None) -> Iterator[str]:
    """The UTF-8 text of `path` in blocks (BOM dropped); DataError as `corpora._read_text` words it."""
    check_text_file(path, what)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, first = 0, True
    with f:
        while True:
            try:
                data = f.read(READ_BYTES)
            except OSError as exc:
                raise DataError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
            if b"\x00" in data:
                raise DataError(f"'{path}' is not a text file (it contains NUL bytes)")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise DataError(f"'{path}' is not a text file (invalid UTF-8 at byte {at})") from None
            offset += len(data)
            if on_bytes is not None:
                on_bytes(len(data))
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not data:
                return


class _CharStream:
    """Consecutive character ranges of a block iterator."""

    def __init__(self, blocks: Iterator[str]) -> None:
        self._blocks, self._carry = blocks, ""

    def take(self, n: int) -> Iterator[str]:
        while n > 0:
            if not self._carry:
                self._carry = next(self._blocks, "")
                if not self._carry:
                    return
            piece, self._carry = self._carry[:n], self._carry[n:]
            n -= len(piece)
            yield piece


def _pieces(text: str) -> Iterator[tuple]:
    """("text", piece) events of an in-memory document, in blocks (the chunker's buffer stays small)."""
    for start in range(0, len(text), READ_BYTES):
        yield ("text", text[start:start + READ_BYTES])


class _Source:
    """A corpus as events; `events()` may be called more than once (a bpe tokenizer trains first)."""

    name = ""

    def events(self) -> Iterator[tuple]:
        raise NotImplementedError


class _CorpusSource(_Source):
    """A corpus already in memory (the embedded Austen novels, or a `Corpus`)."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus, self.name = corpus, corpus.name

    def events(self) -> Iterator[tuple]:
        for split in SPLITS:
            yield ("begin_split", split)
            for doc in self.corpus.split(split):
                yield ("begin_doc",)
                yield from _pieces(doc)
                yield ("end_doc",)
            yield ("end_split",)


class _FileSource(_Source):
    """A text file (or text8) streamed: one document per split, cut at character offsets."""

    def __init__(self, path: Path, *, text8: bool, progress: bool) -> None:
        self.path, self.text8, self.name = path, text8, "text8" if text8 else (path.stem or str(path))
        self.what = "text8 file" if text8 else "corpus file"
        check_text_file(path, self.what)
        progress = progress and path.stat().st_size > SCAN_BAR_BYTES  # the scans of a small file are instant
        n, has_text = 0, False
        with _bar(progress, path, "count") as bar:
            for text in _decoded_blocks(path, self.what, bar.update):
                n += len(text)
                has_text = has_text or not text.isspace()
        if not has_text:
            raise DataError(f"corpus '{path}' is empty")
        self.n = n
        if text8:
            cuts = [n * 90 // 100, n * 95 // 100]
        else:
            targets = [round(0.90 * n), round(0.95 * n)]
            before, after = self._line_ends_near(targets, progress)
            cuts, prev = [], 0
            for k, target in enumerate(targets):
                upper = targets[k + 1] if k + 1 < len(targets) else n
                prev = pick_cut(target, prev, upper, before[k], after[k])
                cuts.append(prev)
        self.bounds = [0, *cuts, n]

    def _line_ends_near(self, targets: list[int], progress: bool) -> tuple[list, list]:
        """For each target: the last line end (offset after a newline) < target, the first >= target."""
        before: list[int | None] = [None] * len(targets)
        after: list[int | None] = [None] * len(targets)
        c0 = 0
        with _bar(progress, self.path, "find cuts") as bar:
            for text in _decoded_blocks(self.path, self.what, bar.update):
                for k, target in enumerate(targets):
                    lo = target - c0 - 1  # newline index i gives line end c0 + i + 1
                    if lo > 0:
                        i = text.rfind("\n", 0, min(lo, len(text)))
                        if i >= 0:
                            before[k] = c0 + i + 1
                    if after[k] is None and lo < len(text):
                        i = text.find("\n", max(lo, 0))
                        if i >= 0:
                            after[k] = c0 + i + 1
                c0 += len(text)
        return before, after

    def events(self) -> Iterator[tuple]:
        stream = _CharStream(_decoded_blocks(self.path, self.what))
        for split, a, b in zip(SPLITS, self.bounds, self.bounds[1:]):
            yield ("begin_split", split)
            yield ("begin_doc",)
            for piece in stream.take(b - a):
                yield ("text", piece)
            yield ("end_doc",)
            yield ("end_split",)


class _HFSource(_Source):
    """A dataset saved with `save_to_disk`, read in row batches; splits as `load_corpus` makes them."""

    BATCH = 1000

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, f"hf:{path.name}"
        parts = open_hf(path)
        self.columns = {s: hf_text_column(*parts[s]) for s in SPLITS if parts[s]}
        self.parts = parts
        missing = [s for s in ("valid", "test") if parts[s] is None]
        # (dataset split, first, end) of non-null rows per split; carved as corpora._carve does
        ranges: dict[str, tuple[str, int | None, int | None]] = {s: (s, 0, None) for s in SPLITS}
        if missing:
            n = sum(1 for _ in self._rows("train", 0, None))
            k = max(1, round(0.05 * n))
            rows = range(n)
            if "test" in missing:
                rows, test = rows[:-k], rows[-k:]
                ranges["test"] = ("train", test.start, test.stop)
            if "valid" in missing:
                rows, valid = rows[:-k], rows[-k:]
                ranges["valid"] = ("train", valid.start, valid.stop)
            ranges["train"] = ("train", rows.start, rows.stop)
        self.ranges = ranges

    def _rows(self, part: str, start: int, stop: int | None) -> Iterator[str]:
        """Non-null texts number start..stop-1 (counting non-null rows only) of `part`."""
        ds, column = self.parts[part][0], self.columns[part]
        i = 0
        for batch in ds.select_columns([column]).iter(batch_size=self.BATCH):
            for text in batch[column]:
                if text is None:
                    continue
                if stop is not None and i >= stop:
                    return
                if i >= start:
                    yield text
                i += 1

    def events(self) -> Iterator[tuple]:
        for split in SPLITS:
            yield ("begin_split", split)
            for text in self._rows(*self.ranges[split]):
                yield ("begin_doc",)
                yield from _pieces(text)
                yield ("end_doc",)
            yield ("end_split",)


def _open_source(source: Any, progress: bool) -> _Source:
    """The reader of a SOURCE spec: what `load_corpus` understands, streamed where it can be."""
    if isinstance(source, Corpus):
        return _CorpusSource(source)
    if isinstance(source, Path):
        return _FileSource(source, text8=False, progress=progress)
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"source must be a non-empty corpus spec; got {source!r}")
    if is_prepared(source) is not None:
        raise DataError(f"source {source!r} is already a prepared token directory")
    prefix, _, rest = source.partition(":")
    if prefix in ("text8", "hf") and not rest.strip():
        raise ConfigError(f"corpus {source!r} needs a path after '{prefix}:'")
    if prefix == "text8":
        if not Path(rest).exists():
            raise DataError(f"text8 file '{rest}' not found (fetch {TEXT8_URL} and unzip it)")
        return _FileSource(Path(rest), text8=True, progress=progress)
    if prefix == "hf":
        return _HFSource(Path(rest))
    if source == "austen":
        return _CorpusSource(load_corpus("austen"))
    return _FileSource(Path(source), text8=False, progress=progress)


# -- chunks and jobs ----------------------------------------------------------------------------


def _cut(buf: str, pad: bool, size: int, final: bool) -> int | None:
    """Where to end the next chunk of `buf`, or None to wait for more text."""
    if pad:
        if len(buf) >= size:
            i = buf.find("\n", size - 1)
            if i >= 0:
                return i + 1
        return len(buf) if final else None
    if len(buf) <= size:
        return len(buf) if final else None
    if len(buf) < 2 * size and not final:
        return None
    match = _WRAP_CUT.search(buf, size, 2 * size)
    return match.start() if match else size


def _chunks(events: Iterator[tuple], pad: bool, size: int) -> Iterator[tuple]:
    """The events with each document's text re-cut into ("text", chunk) of about `size` characters."""
    buf = ""
    for event in events:
        if event[0] != "text" and event[0] != "end_doc":
            yield event
            continue
        final = event[0] == "end_doc"
        if not final:
            buf += event[1]
        while buf:
            cut = _cut(buf, pad, size, final)
            if cut is None:
                break
            yield ("text", buf[:cut])
            buf = buf[cut:]
        if final:
            yield event


def _batches(items: Iterator[tuple], size: int) -> Iterator[list[tuple]]:
    """Items grouped so that each group's text totals at least `size` characters (the last may
    hold less): one job per group keeps short documents (a line of LM1B) from costing a job each."""
    group: list[tuple] = []
    chars = 0
    for item in items:
        group.append(item)
        if item[0] == "text":
            chars += len(item[1])
            if chars >= size:
                yield group
                group, chars = [], 0
    if group:
        yield group


_WORKER: tuple[Tokenizer, np.dtype, bool] | None = None  # (tokenizer, dtype, pad) in a worker


def _init_worker(tok_dict: dict, tok_print: str, dtype: str, pad: bool) -> None:
    """Worker set-up: a forked worker keeps the parent's tokenizer; a spawned one rebuilds it."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = _WORKER[0] if _WORKER is not None and fingerprint(_WORKER[0]) == tok_print else tokenizer_from_dict(tok_dict)
    _WORKER = (tok, np.dtype(dtype), pad)


def _encode(tok: Tokenizer, dtype: np.dtype, pad: bool, text: str) -> tuple[np.ndarray, int, np.ndarray | None]:
    """(ids, normalised characters, ids per line (pad) or None) of one chunk."""
    if not pad:
        norm = tok.normalize(text)
        return np.asarray(tok.encode(norm), dtype=dtype), len(norm), None
    ids: list[int] = []
    lengths: list[int] = []
    chars = 0
    for line in text.splitlines():
        if line.strip():
            line_ids = tok.encode(line)
            ids.extend(line_ids)
            lengths.append(len(line_ids))
            chars += len(tok.normalize(line))
    return np.asarray(ids, dtype=dtype), chars, np.asarray(lengths, dtype=np.int64)


def _encode_texts(texts: list[str]) -> list[tuple[np.ndarray, int, np.ndarray | None]]:
    """The job a worker runs."""
    tok, dtype, pad = _WORKER
    return [_encode(tok, dtype, pad, t) for t in texts]


def _encoded(groups: Iterator[list[tuple]], workers: int, tok: Tokenizer, dtype: np.dtype,
             pad: bool) -> Iterator[tuple[list[tuple], list]]:
    """(group, encodings of its texts) in order; `workers` > 1 tokenizes in that many processes
    with at most 2 x workers + 1 groups in flight."""
    if workers == 1:
        for group in groups:
            yield group, [_encode(tok, dtype, pad, item[1]) for item in group if item[0] == "text"]
        return
    global _WORKER
    _WORKER = (tok, dtype, pad)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no rayon pool across a fork
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(tok.to_dict(), fingerprint(tok), dtype.str, pad))
    pending: deque = deque()
    try:
        for group in groups:
            texts = [item[1] for item in group if item[0] == "text"]
            pending.append((group, pool.submit(_encode_texts, texts) if texts else None))
            while len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result() if future is not None else []
        while pending:
            done, future = pending.popleft()
            yield done, future.result() if future is not None else []
    except BrokenProcessPool:
        raise DataError("a tokenizer worker died (killed, or out of memory)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- writing -------------------------------------------------------------------------------------


class _SplitWriter:
    """Appends one split's ids to shards of at most `shard_tokens` tokens, hashing as it writes,
    and its offsets to a scratch file."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.position = 0
        self.shards: list[dict] = []
        self._file = None
        self._hash = None
        self._in_shard = 0
        self._offsets_path = folder / f".{split}_offsets.raw"
        self._offsets_file = open(self._offsets_path, "wb")
        self._offsets: list[int] = []
        self.n_offsets = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):05d}.bin"
                self._file, self._hash, self._in_shard = open(self.folder / name, "wb"), hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            part = ids[: self.shard_tokens - self._in_shard]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += len(part)
            self.position += len(part)
            ids = ids[len(part):]
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def mark(self, offset: int) -> None:
        self._offsets.append(offset)
        if len(self._offsets) >= 1 << 16:
            self._flush_offsets()

    def _flush_offsets(self) -> None:
        np.asarray(self._offsets, dtype="<i8").tofile(self._offsets_file)
        self.n_offsets += len(self._offsets)
        self._offsets = []

    def close(self) -> dict:
        """Finish the shards and the offsets; the index entry's shards and offsets."""
        if self._file is not None:
            self._close_shard()
        self.mark(self.position)  # the end
        self._flush_offsets()
        self._offsets_file.close()
        n = self.n_offsets
        if n <= OFFSETS_INLINE:
            offsets: Any = np.fromfile(self._offsets_path, dtype="<i8").tolist()
        else:
            name = f"{self.split}_offsets.npy"
            out = np.lib.format.open_memmap(self.folder / name, mode="w+", dtype="<i8", shape=(n,))
            step = 1 << 20
            for start in range(0, n, step):
                out[start:start + step] = np.fromfile(self._offsets_path, dtype="<i8", count=min(step, n - start),
                                                      offset=8 * start)
            out.flush()
            del out
            offsets = {"file": name, "count": n, "sha256": sha256_file(self.folder / name)}
        self._offsets_path.unlink()
        return {"shards": self.shards, "offsets": offsets}

    def abort(self) -> None:
        for f in (self._file, self._offsets_file):
            if f is not None and not f.closed:
                f.close()


def _bar(progress: bool, path: Path | None = None, desc: str = "", **kw):
    from ddlm.progress import progress_bar

    if path is not None:
        try:
            kw.setdefault("total", path.stat().st_size)
        except OSError:
            pass
        kw.setdefault("unit", "B")
    kw.setdefault("leave", False)
    return progress_bar(desc=desc, unit_scale=True, disable=not progress, **kw)


def _tokenize_into(folder: Path, src: _Source, tok: Tokenizer, *, packing: str, align: int,
                   shard_tokens: int, chunk_chars: int, workers: int, progress: bool) -> dict:
    """Tokenize every split of `src` into `folder`; the index's "splits" entry."""
    pad = packing == "pad"
    dtype = token_dtype(tok)
    eos = np.array([tok.bos_id], dtype=dtype)
    splits: dict[str, dict] = {}
    writer: _SplitWriter | None = None
    stats: dict[str, Any] = {}
    doc_start = doc_chars = 0
    encoded = _encoded(_batches(_chunks(src.events(), pad, chunk_chars), chunk_chars), workers, tok, dtype, pad)
    bar = _bar(progress, desc="tokenize", unit="tok", leave=True)
    try:
        for group, results in encoded:
            results = iter(results)
            for item in group:
                kind = item[0]
                if kind == "text":
                    ids, chars, lengths = next(results)
                    stats["has_text"] = stats["has_text"] or not item[1].isspace()
                    if pad:  # each line's first token
                        start = writer.position
                        for length in lengths.tolist():
                            writer.mark(start)
                            start += length
                        stats["documents"] += len(lengths)
                    writer.write(ids)
                    stats["content_tokens"] += len(ids)
                    stats["characters"] += chars
                    doc_chars += chars
                    bar.update(len(ids))
                elif kind == "begin_doc":
                    doc_start, doc_chars = writer.position, 0
                elif kind == "end_doc":
                    if not pad and doc_chars > 0:  # a document whose normalised text is empty is skipped
                        writer.mark(doc_start)
                        writer.write(eos)
                        stats["documents"] += 1
                        if align and writer.position % align:
                            writer.write(np.full(align - writer.position % align, tok.pad_id, dtype=dtype))
                elif kind == "begin_split":
                    writer = _SplitWriter(folder, item[1], dtype, shard_tokens)
                    stats = {"name": item[1], "has_text": False, "documents": 0, "content_tokens": 0,
                             "characters": 0}
                elif kind == "end_split":
                    if not stats["has_text"]:
                        raise DataError(f"corpus '{src.name}' is too small to give a non-empty {stats['name']} split")
                    entry = writer.close()
                    splits[stats["name"]] = {"tokens": writer.position, "content_tokens": stats["content_tokens"],
                                             "characters": stats["characters"], "documents": stats["documents"],
                                             **entry}
                    writer = None
    finally:
        bar.close()
        encoded.close()
        if writer is not None:
            writer.abort()
    return splits


# -- the whole prepare ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Temporary directories of earlier prepares of `out` whose process is gone (killed)."""
    for kind in ("prepare", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rpartition("-")[2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; name a directory for the prepared corpus")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out '{out}' exists and is not empty; give --overwrite to replace it")
        if not (out / "index.json").is_file():
            raise ConfigError(f"--out '{out}' is not a prepared corpus (no index.json); refusing to replace it")


def _make_tokenizer(spec: Any, src: _Source, bpe_vocab_size: int, chunk_chars: int) -> Tokenizer:
    """The tokenizer `spec` names; bpe trains on the source's train split, streamed."""
    if not isinstance(spec, str):
        return spec
    if spec != "bpe":
        return build_tokenizer(spec)

    def train_pieces() -> Iterator[str]:
        in_train, first = False, True
        for event in _chunks(src.events(), False, chunk_chars):
            if event[0] == "begin_split":
                in_train = event[1] == "train"
            elif in_train and event[0] == "end_split":
                return
            elif in_train and event[0] == "begin_doc":
                if not first:
                    yield "\n"  # as prepare_data joins the train documents
                first = False
            elif in_train and event[0] == "text":
                yield event[1]

    return BPETokenizer.train_from_pieces(train_pieces(), bpe_vocab_size)


def _positive(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def prepare_corpus(source: Any, tokenizer: Any, out: str | Path, *, workers: int = 1, packing: str = "wrap",
                   seq_len: int | None = None, align: int = 0, shard_tokens: int = SHARD_TOKENS,
                   overwrite: bool = False, progress: bool = True, bpe_vocab_size: int = 2048,
                   chunk_chars: int = CHUNK_CHARS) -> dict:
    """Tokenize `source` (a `load_corpus` spec, a Path or a Corpus) with `tokenizer` (a name, or a
    Tokenizer) into the directory `out` (see the module docstring). `seq_len` only checks that every
    split gives a row of that length (rows are cut when read). Returns a summary with timings."""
    if packing not in PACKINGS:
        raise ConfigError(f"unknown packing {packing!r}; choose one of: {', '.join(PACKINGS)}")
    for name, value, low in (("--workers", workers, 1), ("--shard-tokens", shard_tokens, 1),
                             ("--align", align, 0), ("chunk_chars", chunk_chars, 1)):
        _positive(name, value, low)
    if seq_len is not None:
        _positive("--seq-len", seq_len, 2)
    if align and packing != "wrap":
        raise ConfigError("--align applies to wrap packing only")
    if align and seq_len is not None and seq_len % align:
        raise ConfigError(f"--seq-len {seq_len} must be a multiple of --align {align}")
    out = Path(out)
    _check_out(out, overwrite)
    src = _open_source(source, progress)
    tok = _make_tokenizer(tokenizer, src, bpe_vocab_size, chunk_chars)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp = out.parent / f".{out.name}.prepare-{os.getpid()}"
    started = time.perf_counter()
    try:
        tmp.mkdir()
        splits = _tokenize_into(tmp, src, tok, packing=packing, align=align, shard_tokens=shard_tokens,
                                chunk_chars=chunk_chars, workers=workers, progress=progress)
        seconds = time.perf_counter() - started
        index = _index(source, src, tok, packing=packing, align=align, seq_len=seq_len, chunk_chars=chunk_chars,
                       splits=splits)
        if seq_len is not None:
            for split in SPLITS:
                rows_available(index, split, seq_len, src.name)
        (tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(s["tokens"] for s in splits.values())
    return {"out": str(out), "source": index["source"], "tokenizer": tok.name, "packing": packing,
            "workers": workers, "dtype": index["dtype"], "seconds": seconds, "tokens": total,
            "tokens_per_second": total / max(seconds, 1e-9),
            "splits": {name: {"tokens": s["tokens"], "documents": s["documents"], "characters": s["characters"],
                              "shards": len(s["shards"])} for name, s in splits.items()}}


def _index(source: Any, src: _Source, tok: Tokenizer, *, packing: str, align: int, seq_len: int | None,
           chunk_chars: int, splits: dict) -> dict:
    from ddlm import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "ddlm_version": __version__,
            "source": source.name if isinstance(source, Corpus) else str(source), "corpus": src.name,
            "tokenizer": tok.to_dict(), "tokenizer_fingerprint": fingerprint(tok),
            "tokenizer_sha256": hashlib.sha256(canonical_json(tok.to_dict()).encode("utf-8")).hexdigest(),
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "mask_id": tok.mask_id,
            "pad_id": tok.pad_id, "dtype": token_dtype(tok).name, "packing": packing, "align": align,
            "seq_len": seq_len, "chunk_chars": chunk_chars, "offsets": "document starts" if packing == "wrap"
            else "line starts", "splits": splits}


def _install(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (empty, or a prepared corpus being overwritten) is
    moved aside first and removed after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------
