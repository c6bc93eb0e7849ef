"""`ddlm sample --show`: the denoising drawn live in the terminal. Each frame redraws every sample
with masked positions as a shaded glyph, the tokens this step fixed highlighted, and the step and
NFE counter; EDLM's frames say which of the k proposals the energy kept for each row. On a stream
that is not a terminal only the last frame is written (plain text)."""
from __future__ import annotations

import sys
import time

from ddlm.sampling.trace import Frame
from ddlm.viewer.frames import piece_of

CLEAR, BOLD, DIM, RESET = "\x1b[H\x1b[2J", "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


class TerminalView:
    """An on_frame callback for sampling.trace.Recorder."""

    def __init__(self, tokenizer, *, title: str, stream=None, min_interval: float = 0.03) -> None:
        self.tokenizer, self.title = tokenizer, title
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.min_interval = min_interval
        self.previous: Frame | None = None
        self.last_draw = 0.0
        self.step = 0
        self.pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = piece_of(self.tokenizer, token)
        return self.pieces[token]

    def __call__(self, frame: Frame) -> None:
        if frame.note.get("start"):
            self.step = 0
        else:
            self.step += 1
        now = time.perf_counter()
        if self.live and (now - self.last_draw >= self.min_interval or frame.note.get("final")):
            self.stream.write(CLEAR + self.render(frame, colour=True))
            self.stream.flush()
            self.last_draw = now
        self.previous = frame

    def render(self, frame: Frame, *, colour: bool) -> str:
        lines = [f"{self.title}  ·  step {self.step}  ·  NFE {frame.nfe}"]
        chosen = frame.note.get("chosen")
        if chosen:
            kept = ", ".join(f"sample {row + 1}: proposal {j + 1}/{frame.note.get('k', '?')}"
                             for row, j in sorted(chosen.items()))
            lines.append(f"energy kept {kept}")
        before = self.previous.tokens if self.previous is not None else None
        for i, row in enumerate(frame.tokens.tolist()):
            text = []
            for p, token in enumerate(row):
                piece = self.piece(token)
                fresh = before is not None and p < before.shape[1] and i < before.shape[0] \
                    and int(before[i, p]) != token
                if colour and token == self.tokenizer.mask_id:
                    piece = DIM + piece + RESET
                elif colour and fresh:
                    piece = BOLD + piece + RESET
                text.append(piece)
            lines.append(f"── sample {i + 1} " + "─" * 30)
            lines.append("".join(text))
        return "\n".join(lines) + "\n"
