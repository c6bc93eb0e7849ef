"""Detokenizers of the zero-shot corpora: the text transformations the papers' public code applies
to PTB, WikiText, LAMBADA and LM1B rows before GPT-2 tokenisation (docs/zero-shot.md).

The rules are the same, in the same order, in kuleshov-group/mdlm `dataloader.py`,
louaaron/Score-Entropy-Discrete-Diffusion `data.py` and kuleshov-group/bd3lms `dataloader.py`
(`wt_detokenizer`, `ptb_detokenizer`, `lm1b_detokenizer`, `lambada_detokenizer`). They are
reimplemented here rule by rule, quirks included, so that a zero-shot figure scores the same text.

    DETOKENIZERS            name -> function (ptb, wikitext, lambada, lm1b)
    detokenizer_for(spec)   the detokenizer a corpus name or path calls for (None: none), or an
                            explicit choice ("none" or a name of DETOKENIZERS)
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ddlm.errors import ConfigError


def _replace(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """Each (old, new) substring replacement in turn (str.replace: left to right, non-overlapping)."""
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _unpad(opening: str, closing: str) -> tuple[re.Pattern, Callable]:
    """A rule that drops the spaces just inside the shortest `opening` ... `closing` span."""
    pattern = re.compile(f"{re.escape(opening)}\\s*([^{re.escape(closing)}]*?)\\s*{re.escape(closing)}")
    return pattern, lambda m: f"{opening}{m.group(1)}{closing}"


_WT_NUMBERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_WT_PUNCTUATION = ((" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "))
_WT_BRACKETS = tuple(_unpad(a, b) for a, b in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'")))
_WT_HEADINGS = (("= = = =", "===="), ("= = =", "==="), ("= =", "=="))
_WT_LAST = ((" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"))
# The public code's second rule, re.sub(r"/' [0-9]/", r"/'[0-9]/", ...), matches only the literal
# "/' " + digit + "/" and writes the literal text "/'[0-9]/" (the replacement is not a pattern).
_WT_QUIRK = re.compile(r"/' [0-9]/")


def wikitext(text: str) -> str:
    """WikiText-2/-103 (raw): `wt_detokenizer` of kuleshov-group/mdlm dataloader.py (identical in
    SEDD data.py and bd3lms dataloader.py): "s '" -> "s'"; the "/' d/" quirk; the @-@, @,@, @.@
    number separators joined; space before : ; . ! ? , dropped; spaces inside (), [], {}, "" and
    '' pairs dropped; "= = =" headings closed up; " ° " -> "°"; spaces next to newlines dropped;
    " N " -> " 1 " (one pass); " 's" -> "'s"."""
    text = text.replace("s '", "s'")
    text = _WT_QUIRK.sub(lambda m: "/'[0-9]/", text)
    text = _replace(text, _WT_NUMBERS + _WT_PUNCTUATION)
    for pattern, closed in _WT_BRACKETS:
        text = pattern.sub(closed, text)
    return _replace(text, _WT_HEADINGS + _WT_LAST)


def ptb(text: str) -> str:
    """Penn Treebank (ptb_text_only): `ptb_detokenizer` of kuleshov-group/mdlm dataloader.py
    (identical in SEDD data.py and bd3lms dataloader.py): " 's" -> "'s", "s ' " -> "s' ",
    " n't" -> "n't", " \\n " -> "\\n", "\\/" -> "/", " N " -> " 1 " repeated ten times (so runs
    "N N N" are all replaced), "$ 1" -> "$1", "# 1" -> "#1", "<unk>" -> "?"."""
    text = _replace(text, ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")))
    for _ in range(10):
        text = text.replace(" N ", " 1 ")
    return _replace(text, (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")))


_LM1B_RULES: tuple[tuple[re.Pattern | str, str | Callable], ...] = (
    ("http : / / ", "http://"),
    ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), lambda m: f"'{m.group(1)}"),
    (re.compile(r" (\w+) \. "), lambda m: f" {m.group(1)}. "),
    (re.compile(r" (\w+) \.$"), lambda m: f" {m.group(1)}."),
    (" ? ", "? "),
    (re.compile(r" \?$"), "?"),
    (" ! ", "! "),
    (re.compile(r" !$"), "!"),
    (" , ", ", "),
    (" : ", ": "),
    (" ; ", "; "),
    (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), lambda m: f'"{m.group(1)}"'),
    (re.compile(r"' ([^']+) '"), lambda m: f"'{m.group(1)}'"),
    (re.compile(r"\( ([^()]+) \)"), lambda m: f"({m.group(1)})"),
    (re.compile(r"\[ ([^\[\]]+) \]"), lambda m: f"[{m.group(1)}]"),
    ("$ ", "$"),
    ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
)


def lm1b(text: str) -> str:
    """One Billion Words (LM1B): `lm1b_detokenizer` of kuleshov-group/mdlm dataloader.py
    (identical in SEDD data.py and bd3lms dataloader.py): "http : / / " -> "http://"; " 'word"
    -> "'word"; " word . " -> " word. " and a final " word ." -> " word."; space before ? ! , : ;
    dropped (and before a final ? or !); " / " -> "/"; the spaces just inside "..." '...' (...)
    [...] dropped; "$ " -> "$", "£ " -> "£". `$` anchors at the end of the text (or before a
    final newline), as in Python's re without MULTILINE."""
    for rule, new in _LM1B_RULES:
        text = text.replace(rule, new) if isinstance(rule, str) else rule.sub(new, text)
    return text


def lambada(text: str) -> str:
    """LAMBADA (OpenAI's lambada_test.jsonl): `lambada_detokenizer` of kuleshov-group/mdlm
    dataloader.py (identical in SEDD data.py and bd3lms dataloader.py): curly double quotes
    become straight ones, and the passage, stripped, is preceded by a newline."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {"ptb": ptb, "wikitext": wikitext, "lambada": lambada,
                                                 "lm1b": lm1b}

# A corpus name (lower case, letters and digits only) that starts with one of these is that corpus.
_NAME_PREFIXES = (("wikitext", "wikitext"), ("wt103", "wikitext"), ("wt2", "wikitext"),
                  ("ptb", "ptb"), ("penntreebank", "ptb"), ("lambada", "lambada"),
                  ("lm1b", "lm1b"), ("1bw", "lm1b"), ("onebillion", "lm1b"), ("billionword", "lm1b"))


def _corpus_of_name(name: str) -> str | None:
    """The DETOKENIZERS key a file or folder name says (wikitext-103-raw-v1, ptb.valid, lm1b-gpt2)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return next((corpus for prefix, corpus in _NAME_PREFIXES if key.startswith(prefix)), None)


def detokenizer_name(spec: str, explicit: str | None = None) -> str | None:
    """The detokenizer for corpus `spec`: `explicit` when given ("none": no detokenizer), else the
    one its name says (a bare name such as 'ptb' or 'wikitext103', or the folder of hf:PATH / the
    file of PATH, then its parent folder), else None."""
    if explicit:
        if explicit == "none":
            return None
        if explicit not in DETOKENIZERS:
            raise ConfigError(f"unknown detokenizer {explicit!r}; choose one of: none, {', '.join(DETOKENIZERS)}")
        return explicit
    prefix, _, rest = spec.partition(":")
    path = Path(rest if prefix in ("hf", "text8", "prepared") and rest else spec)
    for part in (path.name, path.stem, path.parent.name):
        found = _corpus_of_name(part) if part else None
        if found:
            return found
    return None


def detokenizer_for(spec: str, explicit: str | None = None) -> Callable[[str], str] | None:
    """The detokenizer function of `detokenizer_name(spec, explicit)` (None: text used as it is)."""
    name = detokenizer_name(spec, explicit)
    return DETOKENIZERS[name] if name else None
