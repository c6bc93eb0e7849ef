"""Corpora: named text sources split deterministically into train/valid/test documents.

Split rules, by spec:

- "austen" (embedded; the six Jane Austen novels): the full text is cut at line
  boundaries into 200 roughly equal contiguous chunks (cut k is the line boundary
  nearest to k/200 of the characters). Chunk i goes to valid when i % 20 == 18,
  to test when i % 20 == 19, and to train otherwise (90/5/5, matched across the
  six novels). Each split's chunks, in order, are its documents.
- "text8:PATH": first 90% of the characters train, next 5% valid, last 5% test
  (90M/5M/5M for the real 100M-char file); one document per split.
- "hf:PATH": a dataset written by `datasets.save_to_disk`; a DatasetDict gives its
  train / validation (or valid) / test splits, a missing valid or test split being
  the last 5% of the train rows (valid before test); a single Dataset splits
  90/5/5 by row order. Text column "text", else the only string column. One row,
  one document.
- anything else: a UTF-8 text file, split 90/5/5 by characters at the line
  boundary nearest each cut (mid-line only when no line boundary lies between
  the neighbouring cuts); one document per split.

`ddlm.data.prepare` streams the same sources with the same rules (`pick_cut`, `open_hf`,
`hf_text_column` are shared with it) into token shards; a "prepared:DIR" spec names such a
directory, which `load_corpus` refuses (it holds tokens, not text).
"""

from __future__ import annotations

import bisect
import gzip
import os
import re
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ddlm.errors import ConfigError, DataError

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
AUSTEN_CHUNKS = 200
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}


@dataclass
class Corpus:
    """Documents of the three splits of one corpus."""

    name: str
    train: list[str]
    valid: list[str]
    test: list[str]

    def split(self, name: str) -> list[str]:
        """Documents of split "train", "valid" (or "validation") or "test"."""
        key = _SPLIT_ALIASES.get(name)
        if key is None:
            raise ConfigError(f"unknown split {name!r}; choose one of: train, valid, validation, test")
        return getattr(self, key)


def corpus_names() -> str:
    """Help text listing the accepted corpus specs."""
    return (
        "austen (embedded Jane Austen novels), text8:PATH (the text8 file), "
        "hf:PATH (a Hugging Face dataset saved with save_to_disk), a path to a UTF-8 text file, "
        "or prepared:DIR (tokens written by `ddlm data prepare`; training and evaluation only)"
    )


def load_corpus(spec: str | Path, *, text8_download: bool = False, cache_dir: str | Path | None = None) -> Corpus:
    """Load and split the corpus named by `spec` (see the module docstring)."""
    if isinstance(spec, Path):
        return _load_text_file(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"corpus must be a non-empty string; got {spec!r}; expected {corpus_names()}")
    if spec == "austen":
        return _load_austen()
    prefix, _, rest = spec.partition(":")
    if prefix == "prepared" or (Path(spec) / "index.json").is_file():
        raise DataError(f"corpus {spec!r} is a prepared token directory: it holds tokens, not text; "
                        f"training and evaluation read it (--data.corpus), text tools need the original source")
    if prefix in ("text8", "hf") and not rest.strip():
        raise ConfigError(f"corpus {spec!r} needs a path after '{prefix}:'")
    if prefix == "text8":
        return _load_text8(Path(rest), text8_download, cache_dir)
    if prefix == "hf":
        return _load_hf(Path(rest))
    return _load_text_file(Path(spec))


def _cut_offsets(text: str, fractions: list[float]) -> list[int]:
    """Offsets near each fraction of len(text), at the nearest line boundary that keeps cuts ordered."""
    n = len(text)
    ends = [m.end() for m in re.finditer("\n", text)]  # offset just after each newline
    targets = [round(f * n) for f in fractions]
    cuts: list[int] = []
    prev = 0
    for k, target in enumerate(targets):
        upper = targets[k + 1] if k + 1 < len(targets) else n
        j = bisect.bisect_left(ends, target)
        before = ends[j - 1] if j > 0 else None
        after = ends[j] if j < len(ends) else None
        prev = pick_cut(target, prev, upper, before, after)
        cuts.append(prev)
    return cuts


def pick_cut(target: int, prev: int, upper: int, before: int | None, after: int | None) -> int:
    """The cut for `target`: of `before` (the last line end < target) and `after` (the first line
    end >= target), those strictly between `prev` and `upper`, the nearest (the earlier on a tie);
    `target` itself when neither qualifies. Shared with the streaming reader of ddlm.data.prepare."""
    near = [e for e in (before, after) if e is not None and prev < e < upper]
    return min(near, key=lambda e: (abs(e - target), e)) if near else target


def _pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the ordered offsets `cuts`."""
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _checked(name: str, train: list[str], valid: list[str], test: list[str], size: str) -> Corpus:
    """Corpus of the splits; DataError when a split holds no text."""
    for split, docs in (("train", train), ("valid", valid), ("test", test)):
        if not any(d.strip() for d in docs):
            raise DataError(f"corpus '{name}' is too small to give a non-empty {split} split ({size})")
    return Corpus(name, train, valid, test)


def check_text_file(path: Path, what: str) -> None:
    """DataError unless `path` is an existing regular file (reading a FIFO or a device would block
    or never end)."""
    if not path.exists():
        raise DataError(f"{what} '{path}' not found")
    if path.is_dir():
        raise DataError(f"{what} '{path}' is a directory; expected a text file")
    if not path.is_file():
        raise DataError(f"{what} '{path}' is not a regular file (a FIFO, device or socket); expected a text file")


def _read_text(path: Path, what: str = "corpus file") -> str:
    """UTF-8 content of `path`; DataError when missing, binary or empty."""
    check_text_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise DataError(f"'{path}' is not a text file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not a text file (invalid UTF-8 at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"corpus '{path}' is empty")
    return text


def _load_text_file(path: Path) -> Corpus:
    """Plain text file, 90/5/5 by characters at line boundaries."""
    text = _read_text(path)
    train, valid, test = _pieces(text, _cut_offsets(text, [0.90, 0.95]))
    return _checked(path.stem or str(path), [train], [valid], [test], f"{len(text)} chars")


def austen_text() -> str:
    """The embedded Jane Austen text."""
    data = resources.files("ddlm.data").joinpath("austen.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")


def _load_austen() -> Corpus:
    """Embedded corpus, split by the 200-chunk rule of the module docstring."""
    text = austen_text()
    chunks = _pieces(text, _cut_offsets(text, [k / AUSTEN_CHUNKS for k in range(1, AUSTEN_CHUNKS)]))
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, chunk in enumerate(chunks):
        splits[{18: "valid", 19: "test"}.get(i % 20, "train")].append(chunk)
    return _checked("austen", splits["train"], splits["valid"], splits["test"], f"{len(text)} chars")


def _extract_text8_zip(zip_path: Path, dest: Path) -> Path:
    """Extract the 'text8' member of `zip_path` to dest/text8 atomically; return that path."""
    target = Path(dest) / "text8"
    tmp = target.with_name(f".text8.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            member = "text8" if "text8" in names else (names[0] if len(names) == 1 else None)
            if member is None:
                raise DataError(f"'{zip_path}' holds no 'text8' file (members: {', '.join(names[:5]) or 'none'})")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot extract text8 from '{zip_path}': {exc}") from None
    return target


def _download_text8(dest: Path) -> Path:
    """Fetch text8.zip from TEXT8_URL into `dest` (once) and extract it."""
    target = dest / "text8"
    if target.is_file():
        return target
    zip_path = dest / "text8.zip"
    if not zip_path.is_file():
        tmp = zip_path.with_name(f".text8.zip.tmp{os.getpid()}")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(TEXT8_URL, tmp)
            os.replace(tmp, zip_path)
        except OSError as exc:  # URLError is an OSError
            tmp.unlink(missing_ok=True)
            raise DataError(f"cannot download text8 from {TEXT8_URL}: {getattr(exc, 'reason', exc)}") from None
    return _extract_text8_zip(zip_path, dest)


def _load_text8(path: Path, download: bool, cache_dir: str | Path | None) -> Corpus:
    """text8 at `path` (downloaded into cache_dir, default path's folder, when allowed)."""
    if not path.exists():
        if not download:
            raise DataError(f"text8 file '{path}' not found; enable text8 download to fetch {TEXT8_URL}")
        path = _download_text8(Path(cache_dir) if cache_dir is not None else path.parent)
    text = _read_text(path, "text8 file")
    n = len(text)
    a, b = n * 90 // 100, n * 95 // 100
    return _checked("text8", [text[:a]], [text[a:b]], [text[b:]], f"{n} chars")


def _hf_texts(ds: object, where: str) -> list[str]:
    """Rows of the text column of a `datasets.Dataset`."""
    column = hf_text_column(ds, where)
    return [t for t in ds[column] if t is not None]


def hf_text_column(ds: object, where: str) -> str:
    """The text column of a `datasets.Dataset`: "text", else its only string column."""
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if "text" in strings:
        column = "text"
    elif len(strings) == 1:
        column = strings[0]
    else:
        raise DataError(
            f"{where} has no string column 'text' and {len(strings)} other string columns "
            f"({', '.join(strings) or 'none'}); expected a 'text' column"
        )
    return column


def _carve(train: list[str], valid: list[str] | None, test: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """Fill missing valid/test splits with the last 5% (each) of the train rows."""
    k = max(1, round(0.05 * len(train)))
    if test is None:
        train, test = train[:-k], train[-k:]
    if valid is None:
        train, valid = train[:-k], train[-k:]
    return train, valid, test


def load_saved_dataset(path: Path):
    """The `datasets.Dataset` or `DatasetDict` saved at `path` (save_to_disk); one line when the
    folder, the package or the dataset is missing or bad."""
    if not path.exists():
        raise DataError(f"dataset folder '{path}' not found")
    try:
        import datasets
    except ImportError:
        raise DataError("hf: corpora need the package 'datasets': pip install datasets") from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many kinds for a bad folder
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load the Hugging Face dataset '{path}': {first}") from None


def open_hf(path: Path) -> dict[str, tuple[object, str] | None]:
    """{"train", "valid", "test"} -> (`datasets.Dataset`, how messages name it), or None for a split
    the dataset saved at `path` lacks (a single Dataset is all train; `_carve` fills the gaps)."""
    import datasets

    obj = load_saved_dataset(path)
    where = f"dataset '{path}'"
    if not isinstance(obj, datasets.DatasetDict):
        return {"train": (obj, where), "valid": None, "test": None}
    if "train" not in obj:
        raise DataError(f"{where} has no 'train' split (it has: {', '.join(obj) or 'none'})")
    valid_key = next((k for k in ("validation", "valid") if k in obj), None)
    return {split: (obj[key], f"{where} split '{key}'") if key in obj else None
            for split, key in (("train", "train"), ("valid", valid_key), ("test", "test"))}


def _load_hf(path: Path) -> Corpus:
    """Hugging Face dataset saved with `save_to_disk`."""
    parts = open_hf(path)
    train, valid, test = (_hf_texts(*parts[s]) if parts[s] else None for s in ("train", "valid", "test"))
    train, valid, test = _carve(train, valid, test)
    return _checked(f"hf:{path.name}", train, valid, test, f"{len(train) + len(valid) + len(test)} rows")
