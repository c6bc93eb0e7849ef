"""Results as JSON lines: every record carries the environment (versions, CPU, threads) beside the
full config and seed the caller puts in, so runs can be compared later. A results file is appended
to atomically, and a run's metrics.jsonl is read back only when every whole line is a record."""
from __future__ import annotations

import json
import numbers
import os
import platform
import stat
import time
from pathlib import Path

import torch

from ddlm.errors import DataError, DdlmError, write_failure

# Fields of a metrics record that its readers compute with: each must be a number when present.
NUMERIC_FIELDS = ("step", "tokens", "tokens_per_s", "val_bpc", "val_bpc_stderr", "val_nll", "val_ppl",
                  "val_tokens", "val_loss", "nonfinite_steps")


def environment() -> dict:
    from ddlm import __version__, runtime

    return {"ddlm": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(runtime.device()), "cpu": runtime.cpu_model(),
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_appendable(path: str | Path, flag: str = "--results") -> None:
    """Refuse, before any work is done, a results file that cannot be appended to: a directory,
    one whose parent is a file, or something other than a regular file, character device or FIFO."""
    target = Path(path)
    if target.is_dir():
        raise DdlmError(f"{flag} '{path}' is a directory; name a file such as results.jsonl")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DdlmError(f"{flag} '{path}': '{parent}' is a file, not a directory")
    if target.exists() and not _appendable_kind(os.stat(target).st_mode):
        raise DdlmError(f"{flag} '{path}' is neither a regular file, a character device nor a FIFO")


def _appendable_kind(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def append_jsonl(path: str | Path, *records: dict) -> None:
    """Append JSON lines to `path`. A regular file is replaced atomically by a copy with the new
    lines (a temporary file beside it, fsynced, renamed over it), so a full disk or a kill leaves
    it as it was; a character device or FIFO is written into. A failure is one line."""
    path = Path(path)
    text = "".join(json.dumps(record, sort_keys=True, default=str) + "\n" for record in records)
    check_appendable(path, "results file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not stat.S_ISREG(os.stat(path).st_mode):
            with open(path, "a") as f:  # a device or FIFO: renaming over it would replace it
                f.write(text)
            return
        _replace_with(path, (path.read_bytes() if path.exists() else b"") + text.encode())
    except OSError as err:
        raise DdlmError(f"could not append to '{path}' ({write_failure(err)}); its earlier records are "
                        f"unchanged") from None


def _replace_with(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (a run's metrics.jsonl). A line that is not whole JSON (a
    kill mid-write leaves one) is skipped; a line that is JSON but not a record (not an object,
    not UTF-8, a number field holding something else) is a DataError naming it: the file was not
    written by ddlm, and nothing is computed from it or rewritten over it."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise DataError(f"cannot read '{path}' ({err.strerror})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"'{path}' line {number} is not UTF-8 text; the file is damaged "
                            f"(remove the line)") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        except RecursionError:
            raise DataError(f"'{path}' line {number} is nested too deeply to be a record") from None
        rows.append(_record(row, path, number))
    return rows


def _record(row, path: Path, number: int) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"'{path}' line {number} is not a JSON object but {str(row)[:40]!r}; the file is "
                        f"damaged (remove the line)")
    for key in NUMERIC_FIELDS:
        value = row.get(key)
        if key in row and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise DataError(f"'{path}' line {number}: {key} is {str(value)[:40]!r}, not a number; the file "
                            f"is damaged (fix or remove the line)")
    return row
