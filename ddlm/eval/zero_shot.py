"""Zero-shot likelihood as the papers report it: a checkpoint scored on a corpus it was not trained
on, with the papers' text preparation (docs/zero-shot.md).

    1. documents: the rows of a split of an hf:PATH dataset (its only split, or every row of a
       single Dataset, when it has no split of that name), one per line of a .txt file (the line
       break kept), the "text" of each line of a .jsonl file (OpenAI's lambada_test.jsonl)
    2. each document detokenized (ddlm.data.detokenizers: chosen by the corpus name, or given)
    3. tokenized with the run's tokenizer, concatenated and cut into windows of the run's L by the
       protocol's BOS/EOS rule; the remainder of the stream is dropped
    4. every window scored by the method's bound (ddlm.eval.likelihood: exact NLL for AR), summed
       over the counted tokens: all but a window's leading BOS, which is given (clean at every t,
       as BD3-LM's ignore_bos), for every method

Protocols (PROTOCOLS), as the public code builds its zero-shot windows:

    mdlm   EOS after every document; windows [BOS] + L-2 tokens + [EOS]     (MDLM, also BD3's
           in-domain data)
    sedd   EOS after every document; windows of L tokens, no BOS           (SEDD)
    bd3    nothing between documents; windows [BOS] + L-2 tokens + [EOS]   (BD3-LM's zero-shot
           scripts: +data.insert_valid_eos=False)

PPL = exp(NLL per counted token) and BPC = the same NLL in bits per character of the (normalised,
detokenized) text the windows cover, each with the standard error of ddlm.eval.likelihood.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddlm.data.blocks import BlockDataset, stream_dtype
from ddlm.data.corpora import _read_text, hf_text_column, load_corpus, load_saved_dataset
from ddlm.data.detokenizers import DETOKENIZERS, detokenizer_name
from ddlm.data.tokenizers import Tokenizer, iter_chunks
from ddlm.errors import ConfigError, DataError


@dataclass(frozen=True)
class Protocol:
    """How the documents of a zero-shot corpus become windows of L tokens."""

    name: str
    eos_after_document: bool  # an EOS follows every document in the stream
    bos_eos_window: bool  # every window is [BOS] + L-2 stream tokens + [EOS] (else L stream tokens)
    source: str  # where the public code does it

    def describe(self, seq_len: int) -> str:
        between = "EOS after every document" if self.eos_after_document else "nothing between documents"
        window = (f"windows [BOS] + {seq_len - 2} tokens + [EOS]" if self.bos_eos_window
                  else f"windows of {seq_len} tokens without BOS")
        return f"{self.name} protocol: {between}, {window}, remainder dropped"


PROTOCOLS = {
    "mdlm": Protocol("mdlm", True, True, "kuleshov-group/mdlm dataloader.py: get_dataset(wrap=True), _group_texts"),
    "sedd": Protocol("sedd", True, False,
                     "louaaron/Score-Entropy-Discrete-Diffusion data.py: get_dataset, group_texts"),
    "bd3": Protocol("bd3", False, True, "kuleshov-group/bd3lms scripts/zs_ppl/*.sh (+data.insert_valid_eos=False), "
                                         "dataloader.py: _group_texts"),
}


def protocol_named(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown zero-shot protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# ---- 1. documents ------------------------------------------------------------------------------
_SPLIT_KEYS = {"train": ("train",), "valid": ("validation", "valid"), "validation": ("validation", "valid"),
               "test": ("test",)}


def read_documents(spec: str, split: str = "valid") -> tuple[list[str], str]:
    """(documents, what was read) of zero-shot corpus `spec`: hf:PATH, FILE.jsonl, FILE (text, one
    document per line), or a ddlm corpus name (austen, text8:PATH: that split's documents)."""
    if split not in _SPLIT_KEYS:
        raise ConfigError(f"unknown split {split!r}; choose one of: train, valid, test")
    prefix, _, rest = spec.partition(":")
    if prefix == "prepared" or (Path(spec) / "index.json").is_file():
        raise DataError(f"zero-shot corpus {spec!r} is a prepared token directory; the protocol "
                        f"detokenizes text, so give the text (hf:PATH or a file)")
    if prefix == "hf":
        return _hf_documents(Path(rest), split)
    if spec == "austen" or prefix == "text8":
        return load_corpus(spec).split(split), f"split '{split}'"
    path = Path(spec)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path), "every line's text"
    return _read_text(path).splitlines(keepends=True), "every line"


def _hf_documents(path: Path, split: str) -> tuple[list[str], str]:
    """Rows of the text column of split `split` of a dataset saved with save_to_disk (its only
    split when it has one alone; every row of a single Dataset)."""
    obj = load_saved_dataset(path)
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        keys = [k for k in _SPLIT_KEYS[split] if k in obj]
        if keys:
            ds, part = obj[keys[0]], f"split '{keys[0]}'"
        elif len(obj) == 1:
            (only,) = obj
            ds, part = obj[only], f"split '{only}' (its only split)"
        else:
            raise DataError(f"dataset '{path}' has no {split} split (it has: {', '.join(obj) or 'none'}); "
                            f"choose one with --split")
    else:
        ds, part = obj, "every row"
    column = hf_text_column(ds, f"dataset '{path}'")
    return [t for t in ds[column] if t is not None], part


def _jsonl_documents(path: Path) -> list[str]:
    """The "text" field of every non-blank line of a JSON-lines file."""
    docs = []
    for number, line in enumerate(_read_text(path, "zero-shot file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"'{path}' line {number} is not JSON; expected {{\"text\": ...}} per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"'{path}' line {number} has no string field 'text'")
        docs.append(row["text"])
    return docs


# ---- 2-3. windows -------------------------------------------------------------------------------
@dataclass
class Windows:
    tokens: np.ndarray  # (N, L) int64
    counted: np.ndarray  # (N, L) bool: the tokens whose NLL is summed
    text_tokens: int  # document tokens inside the windows (no BOS/EOS)
    dropped: int  # stream tokens in no window


def _stream(ids: list[list[int]], eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated documents (each followed by `eos` unless None) and which entries are text."""
    parts, text = [], []
    for doc in ids:
        parts.append(np.asarray(doc, dtype=np.int64))
        text.append(np.ones(len(doc), dtype=bool))
        if eos is not None:
            parts.append(np.asarray([eos], dtype=np.int64))
            text.append(np.zeros(1, dtype=bool))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(parts), np.concatenate(text)


def wrap_documents(ids: list[list[int]], seq_len: int, *, bos: int, eos: int, protocol: Protocol,
                   group_rows: int = 0) -> Windows:
    """Windows of `seq_len` tokens from the token ids of each document, by `protocol`. With
    `group_rows` > 0 every `group_rows` documents are wrapped apart, each group's remainder dropped
    (the public code groups per `datasets.map` batch, 1,000 rows by default); 0: one stream."""
    body = seq_len - 2 if protocol.bos_eos_window else seq_len
    if body < 1:
        raise ConfigError(f"the {protocol.name} protocol needs L >= 3 (BOS, a token, EOS); got L={seq_len}")
    groups = [ids] if group_rows <= 0 else [ids[i:i + group_rows] for i in range(0, len(ids), group_rows)]
    rows, text_tokens, dropped = [], 0, 0
    for group in groups:
        stream, is_text = _stream(group, eos if protocol.eos_after_document else None)
        n = len(stream) // body
        dropped += len(stream) - n * body
        text_tokens += int(is_text[:n * body].sum())
        chunk = stream[:n * body].reshape(n, body)  # (N, body)
        if protocol.bos_eos_window:
            chunk = np.concatenate([np.full((n, 1), bos), chunk, np.full((n, 1), eos)], axis=1)  # (N, L)
        rows.append(chunk)
    tokens = np.concatenate(rows) if rows else np.zeros((0, seq_len), dtype=np.int64)
    if len(tokens) == 0:
        total = sum(len(d) for d in ids) + (len(ids) if protocol.eos_after_document else 0)
        raise DataError(f"zero-shot corpus too small: {total} tokens give no window of {seq_len} "
                        f"under the {protocol.name} protocol")
    counted = np.ones(tokens.shape, dtype=bool)
    if protocol.bos_eos_window:
        counted[:, 0] = False  # the window's BOS is given, not predicted
    return Windows(tokens, counted, text_tokens, dropped)


def _encode(tok: Tokenizer, text: str) -> list[int]:
    """Ids of one document (no special tokens), encoded in pieces as ddlm.data.blocks does."""
    ids: list[int] = []
    for piece in iter_chunks(tok.normalize(text)):
        ids.extend(tok.encode(piece))
    return ids


def _digest(docs: list[str], settings: str) -> str:
    """sha256 (first 16 hex) of the settings and the documents."""
    h = hashlib.sha256(settings.encode())
    for doc in docs:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def zero_shot_dataset(tok: Tokenizer, docs: list[str], seq_len: int, *, protocol: str = "mdlm",
                      detokenizer: str | None = None, group_rows: int = 0) -> tuple[BlockDataset, dict]:
    """The scored windows of `docs` (a BlockDataset whose `valid` mask is the counted tokens, and
    whose chars_per_token makes BPC = bits per character of the text the windows cover) and a
    description of what was built."""
    chosen = protocol_named(protocol)
    detok = DETOKENIZERS[detokenizer] if detokenizer else None
    texts = [detok(d) for d in docs] if detok else list(docs)
    ids = [_encode(tok, t) for t in texts]
    windows = wrap_documents(ids, seq_len, bos=tok.bos_id, eos=tok.eos_id, protocol=chosen, group_rows=group_rows)
    chars = sum(len(tok.normalize(t)) for t in texts)
    all_text = sum(len(i) for i in ids)
    covered_chars = chars * windows.text_tokens / max(all_text, 1)
    counted = int(windows.counted.sum())
    digest = _digest(docs, f"{protocol};{detokenizer};{group_rows};")
    dataset = BlockDataset(windows.tokens.astype(stream_dtype(tok)), windows.counted,
                           max(covered_chars, 1e-12) / counted, digest)
    info = {"protocol": chosen.name, "detokenizer": detokenizer, "documents": len(docs), "windows": len(dataset),
            "stream_tokens": all_text + (len(docs) if chosen.eos_after_document else 0),
            "dropped_tokens": windows.dropped, "text_tokens": windows.text_tokens,
            "counted_tokens": counted, "characters": round(covered_chars), "group_rows": group_rows,
            "windowing": chosen.describe(seq_len), "source": chosen.source}
    return dataset, info


# ---- 4. scoring ----------------------------------------------------------------------------------
class GivenFirst:
    """`method` whose bound takes each window's first position as given (`nll_bound(given=)`:
    clean at every t and not counted): BD3-LM's `ignore_bos` for the window's BOS. Everything
    else is the method's own."""

    def __init__(self, method) -> None:
        self.method = method

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    def nll_bound(self, model, x0, **kwargs):
        import torch

        given = torch.zeros(x0.shape, dtype=torch.bool, device=x0.device)
        given[:, 0] = True
        return self.method.nll_bound(model, x0, given=given, **kwargs)


def evaluate_zero_shot(loaded, data: str, cfg, *, dtype, detokenizer: str | None = None,
                       protocol: str = "mdlm", group_rows: int = 0, documents: tuple[list[str], str] | None = None,
                       progress: bool = False, dist=None) -> dict:
    """Score checkpoint `loaded` (ddlm.build.load_for_inference) on zero-shot corpus `data` with
    the eval config `cfg` (split, batch size, t-samples, max batches, seed). `detokenizer`: a name
    of DETOKENIZERS or "none" (default: the one the corpus name says). `documents`: (docs, what
    was read) when already read."""
    from ddlm.eval.likelihood import evaluate_likelihood

    run = loaded.run
    docs, part = documents if documents is not None else read_documents(data, cfg.split)
    chosen = detokenizer_name(data, detokenizer)
    dataset, info = zero_shot_dataset(loaded.tokenizer, docs, run.data.seq_len, protocol=protocol,
                                      detokenizer=chosen, group_rows=group_rows)
    method = GivenFirst(loaded.method) if PROTOCOLS[protocol].bos_eos_window else loaded.method
    result = evaluate_likelihood(method, loaded.model, dataset, batch_size=cfg.batch_size,
                                 n_samples=cfg.t_samples, max_batches=cfg.max_batches, seed=cfg.seed,
                                 dtype=dtype, progress=progress, dist=dist)
    nll_stderr = result.bpc_stderr * math.log(2) * dataset.chars_per_token
    bound = ("exact NLL" if result.exact else
             f"{loaded.method.name} {loaded.method.bound_name} with {cfg.t_samples} t-sample(s) per window")
    counted = ("every token but the window's BOS, which is given (clean at every t)"
               if PROTOCOLS[protocol].bos_eos_window else "every token")
    text = (f"zero-shot: {part} of {data}, detokenizer {chosen or 'none'}; {info['windowing']}; {bound}; "
            f"counted: {counted} (EOS included); float64 sums over the windows; BPC per character of "
            f"the detokenized text the windows cover")
    return {"method": run.method, "corpus": data, "split": part, "tokenizer": run.data.tokenizer,
            "step": loaded.step, **result.as_dict(), "nll_stderr": nll_stderr,
            "ppl_stderr": result.ppl * nll_stderr, "zero_shot": info, "protocol": text,
            "checkpoint": str(loaded.path)}
