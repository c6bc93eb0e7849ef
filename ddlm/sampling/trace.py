"""The history of a draw, step by step, for the viewers (`ddlm sample --show`, `--show-html`).

A sampler with a `Recorder` reports every change it makes to its tokens; nothing else about the
draw changes (the recorder reads tokens, never the random streams), so the same seed gives the
same sample with and without it, and the last frame is the sample.

The recorder keeps a canvas of every row's whole sequence: `start` sets it (prompt, template or
masks), and each `step` writes a window of it (a BD3-LM block, a sliding window past the context,
a subset of rows that have not stopped). A frame is the canvas after a step, with the network
evaluations spent so far and what the sampler wants to say about the step (EDLM: which of its k
proposals each row kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Frame:
    tokens: torch.Tensor  # (n, L) int64 on the CPU: the canvas after this step
    nfe: int
    note: dict = field(default_factory=dict)


class Recorder:
    """Collects frames; `on_frame(frame)` (e.g. a terminal view) is called as each one arrives."""

    def __init__(self, on_frame: Callable[[Frame], None] | None = None) -> None:
        self.frames: list[Frame] = []  # of the current draw
        self.draws: list[list[Frame]] = []  # every draw's frames (one per batch of samples)
        self.canvas: torch.Tensor | None = None
        self.offset = 0  # where the sampler's current window starts in the canvas
        self.rows: torch.Tensor | None = None  # the canvas rows of the window (None: all)
        self.nfe_before = 0  # evaluations spent by earlier windows / blocks
        self.on_frame = on_frame

    def start(self, tokens: torch.Tensor) -> None:
        """The canvas before any step (n, L): given tokens and MASKs."""
        self.canvas = tokens.detach().to("cpu", torch.long).clone()
        self.offset, self.rows, self.nfe_before = 0, None, 0
        self.frames = []
        self.draws.append(self.frames)
        self.emit(0, {"start": True})

    def window(self, offset: int, rows: torch.Tensor | None = None, nfe_before: int = 0) -> None:
        """The next steps write tokens offset .. offset + W of `rows`."""
        self.offset, self.nfe_before = offset, nfe_before
        self.rows = None if rows is None else rows.detach().to("cpu")

    def step(self, z: torch.Tensor, nfe: int, **note) -> None:
        """The sampler's window z (R, W) after a step, with its evaluations so far."""
        if self.canvas is None:
            return
        width = min(z.shape[1], self.canvas.shape[1] - self.offset)
        z = z[:, :width].detach().to("cpu", torch.long)
        span = slice(self.offset, self.offset + width)
        if self.rows is None:
            self.canvas[:, span] = z
        else:
            self.canvas[self.rows, span] = z
        self.emit(self.nfe_before + nfe, note)

    def emit(self, nfe: int, note: dict) -> None:
        frame = Frame(self.canvas.clone(), nfe, note)
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame(frame)

    def finish(self, tokens: torch.Tensor, nfe: int) -> None:
        """The sample as returned (PAD after a row's end, windows joined): the last frame."""
        final = tokens.detach().to("cpu", torch.long)
        if self.canvas is None or not torch.equal(final, self.frames[-1].tokens):
            self.canvas = final.clone()
            self.emit(nfe, {"final": True})


def note_step(sampler, z: torch.Tensor, nfe: int, **note) -> None:
    """Report a step to the sampler's recorder, if it has one."""
    recorder = getattr(sampler, "recorder", None)
    if recorder is not None:
        recorder.step(z, nfe, **note)
