"""Data layer: tokenizers, corpora, token streams, blocks, batch loading and prepared shards.

Tokenizers and corpora import eagerly; the names of `blocks` (which needs torch) and `prepare`
import on first use, so `ddlm data prepare` and its tokenizer workers start without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ddlm.data.corpora import Corpus, corpus_names, load_corpus
from ddlm.data.tokenizers import (
    BertTokenizer,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Cl100kTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    build_tokenizer,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

_LAZY = {
    "Batch": "blocks",
    "BlockDataset": "blocks",
    "BlockLoader": "blocks",
    "build_datasets": "blocks",
    "encode_documents": "blocks",
    "pad_documents": "blocks",
    "wrap_blocks": "blocks",
    "PreparedCorpus": "prepare",
    "is_prepared": "prepare",
    "open_prepared": "prepare",
    "prepare_corpus": "prepare",
    "prepared_datasets": "prepare",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ddlm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ddlm.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BPETokenizer",
    "Batch",
    "BertTokenizer",
    "BlockDataset",
    "BlockLoader",
    "ByteTokenizer",
    "CharTokenizer",
    "Cl100kTokenizer",
    "Corpus",
    "GPT2Tokenizer",
    "PreparedCorpus",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "corpus_names",
    "encode_documents",
    "fingerprint",
    "is_prepared",
    "load_corpus",
    "load_tokenizer",
    "open_prepared",
    "pad_documents",
    "prepare_corpus",
    "prepared_datasets",
    "save_tokenizer",
    "tokenizer_from_dict",
    "wrap_blocks",
]
