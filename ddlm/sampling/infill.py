"""`--infill "It is a truth [MASK:12] acknowledged, that a single man [MASK:20]."`: text with spans
to fill, as a template (given ids, MASK where the model writes).

    [MASK]     one token
    [MASK:n]   n tokens
    [MASK:?]   up to `open_span` tokens: the span ends at the first EOS the model writes in it
               (the EOS and what follows it in the span are dropped); without one, all are kept

The given pieces are encoded one by one, so every given token is exactly what the text says
(a BPE merge never reaches across a span's edge), and never changes while the spans are filled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ddlm.errors import DataError

SPAN = re.compile(r"\[MASK(?::([^\]]*))?\]")
MAX_SPAN = 4096


@dataclass
class Span:
    start: int  # first template position of the span
    length: int
    open: bool  # [MASK:?]: EOS ends it


@dataclass
class Template:
    ids: list[int]  # given ids and MASK
    spans: list[Span]


def span_length(spec: str | None, open_span: int) -> tuple[int, bool]:
    if spec is None:
        return 1, False
    if spec == "?":
        return open_span, True
    if not spec.isdigit() or not 1 <= int(spec) <= MAX_SPAN:
        raise DataError(f"[MASK:{spec}] must give a number of tokens in 1..{MAX_SPAN}, or ? for an open span")
    return int(spec), False


def parse_infill(text: str, tokenizer, *, open_span: int = 16) -> Template:
    """The template of `text`; one line when it has no span or a malformed one."""
    if "[MASK" not in text:
        raise DataError("--infill text has no [MASK], [MASK:n] or [MASK:?] span to fill")
    stray = re.sub(SPAN, "", text)
    if "[MASK" in stray:
        bad = stray[stray.index("[MASK"):][:16]
        raise DataError(f"--infill: malformed span {bad!r}; write [MASK], [MASK:n] or [MASK:?]")
    ids: list[int] = []
    spans: list[Span] = []
    pos = 0
    for match in SPAN.finditer(text):
        ids += encode_piece(text[pos:match.start()], tokenizer)
        length, is_open = span_length(match.group(1), open_span)
        spans.append(Span(len(ids), length, is_open))
        ids += [tokenizer.mask_id] * length
        pos = match.end()
    ids += encode_piece(text[pos:], tokenizer)
    return Template(ids, spans)


def encode_piece(piece: str, tokenizer) -> list[int]:
    if not piece:
        return []
    tokenizer.check_prompt(piece)
    return tokenizer.encode(piece)


def close_open_spans(row: list[int], template: Template, eos_id: int, pad_id: int) -> list[int]:
    """A filled row with each open span cut at its first EOS (the rest of the span dropped)."""
    out, pos = [], 0
    for span in template.spans:
        out += row[pos:span.start]
        body = row[span.start:span.start + span.length]
        if span.open and eos_id in body:
            body = body[:body.index(eos_id)]
        out += [t for t in body if t != pad_id]
        pos = span.start + span.length
    return out + row[pos:]


def template_tensor(template: Template, context: int) -> torch.Tensor:
    if len(template.ids) > context:
        raise DataError(f"--infill text is {len(template.ids)} tokens with its spans, longer than the model's "
                        f"context of {context}")
    return torch.tensor(template.ids, dtype=torch.long)
