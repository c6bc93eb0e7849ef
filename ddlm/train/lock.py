"""One trainer per run directory: an exclusive lock on OUT/.lock that holds the owner's pid.

The kernel drops a flock when its process dies, so a lock left by a killed trainer is stale by
construction and the next trainer simply takes it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ddlm.errors import ConfigError


class RunLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"run directory '{self.path.parent}' is in use by process {owner} "
                              f"(lock '{self.path}'); wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.release()
