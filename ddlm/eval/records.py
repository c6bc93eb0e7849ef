"""Results as JSON lines: every record carries the environment (versions, CPU, threads) beside the
full config and seed the caller puts in, so runs can be compared later."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def environment() -> dict:
    from ddlm import __version__, runtime

    return {"ddlm": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(runtime.device()), "cpu": runtime.cpu_model(),
            "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (flushed and synced, so a kill leaves whole lines before it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The whole lines of a JSON-lines file; a torn last line (a kill mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
