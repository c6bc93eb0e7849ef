"""One trainer per run directory: an exclusive lock on OUT/.lock that holds the owner's pid.

The kernel drops a flock when its process dies, so a lock left by a killed trainer is stale by
construction and the next trainer simply takes it. The lock file is opened without following a
symbolic link, so taking it never truncates a file outside the run directory.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ddlm.errors import ConfigError


class RunLock:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ConfigError(f"lock '{self.path}' is a symbolic link, which ddlm never follows outside the "
                                  f"run directory '{self.path.parent}' (remove the link)") from None
            raise ConfigError(f"cannot take the lock '{self.path}' of run directory '{self.path.parent}' "
                              f"({err.strerror})") from None
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
