"""Progress bars: live on a terminal; a line every few seconds when stderr is a file or a pipe."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

PIPE_INTERVAL = 5.0  # seconds between lines when stderr is not a terminal


def progress_bar(iterable=None, **kw) -> tqdm:
    """tqdm with its refresh interval chosen by where stderr goes."""
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", PIPE_INTERVAL)
        kw.setdefault("maxinterval", max(PIPE_INTERVAL, 10.0))
    return tqdm(iterable, **kw)
