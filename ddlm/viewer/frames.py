"""A recorded draw as data a viewer shows: each sample's text at every frame, and the frame at
which each of its final tokens was fixed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddlm.sampling.trace import Frame

MASK_GLYPH = "░"  # a masked position, in the terminal and the page


@dataclass
class Timeline:
    """n samples over F frames. `start` (n, L) ids at frame 0; `changes[f]` the (sample, position,
    id) set at frame f; `nfe[f]`; `fixed_at[i][p]` the frame after which position p of sample i
    never changes; `notes[f]` what the sampler said (EDLM: the proposals kept)."""

    start: list[list[int]]
    changes: list[list[tuple[int, int, int]]]
    nfe: list[int]
    fixed_at: list[list[int]]
    notes: list[dict]

    @property
    def frames(self) -> int:
        return len(self.nfe)

    def tokens_at(self, frame: int) -> list[list[int]]:
        rows = [list(row) for row in self.start]
        for changes in self.changes[1:frame + 1]:
            for i, p, token in changes:
                rows[i][p] = token
        return rows


def merge_draws(draws: list[list[Frame]]) -> list[Frame]:
    """Batches drawn one after another, shown side by side: frame f of the merge is frame f of
    every batch (a batch that finished earlier stays at its last frame); NFE adds up."""
    draws = [d for d in draws if d]
    if len(draws) == 1:
        return draws[0]
    width = max(f.tokens.shape[1] for d in draws for f in d)
    merged = []
    for f in range(max(len(d) for d in draws)):
        frames = [d[min(f, len(d) - 1)] for d in draws]
        tokens = torch.cat([pad_right(fr.tokens, width) for fr in frames])
        merged.append(Frame(tokens, sum(fr.nfe for fr in frames), frames[0].note if len(draws) == 1 else {}))
    return merged


def pad_right(tokens: torch.Tensor, width: int, value: int = -1) -> torch.Tensor:
    if tokens.shape[1] >= width:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.shape[0], width - tokens.shape[1]), value)], dim=1)


def timeline(frames: list[Frame]) -> Timeline:
    """Frames -> changes between consecutive frames (positions that appear later, e.g. PAD after a
    row's end, count as changed)."""
    width = max(f.tokens.shape[1] for f in frames)
    grids = [pad_right(f.tokens, width) for f in frames]
    n = grids[0].shape[0]
    fixed = torch.zeros(n, width, dtype=torch.long)
    changes: list[list[tuple[int, int, int]]] = [[]]
    for f in range(1, len(grids)):
        diff = (grids[f] != grids[f - 1]).nonzero().tolist()
        changes.append([(i, p, int(grids[f][i, p])) for i, p in diff])
        for i, p in diff:
            fixed[i, p] = f
    return Timeline(start=grids[0].tolist(), changes=changes, nfe=[f.nfe for f in frames],
                    fixed_at=fixed.tolist(), notes=[f.note for f in frames])


def piece_of(tokenizer, token: int) -> str:
    """How an id shows: its own text; MASK as the shaded glyph; PAD and padding (-1) as nothing."""
    if token == tokenizer.mask_id:
        return MASK_GLYPH
    if token < 0 or token == tokenizer.pad_id:
        return ""
    return tokenizer.decode([token])


def token_pieces(tokenizer, ids: set[int]) -> dict[int, str]:
    return {i: piece_of(tokenizer, i) for i in ids}


def used_ids(line: Timeline) -> set[int]:
    ids = {t for row in line.start for t in row}
    ids.update(token for changes in line.changes for _, _, token in changes)
    return ids


def text_of(row: list[int], pieces: dict[int, str]) -> str:
    return "".join(pieces[t] for t in row)
