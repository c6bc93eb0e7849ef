"""Data layer: tokenizers, corpora, token streams, blocks and batch loading."""

from ddlm.data.blocks import (
    Batch,
    BlockDataset,
    BlockLoader,
    build_datasets,
    encode_documents,
    pad_documents,
    wrap_blocks,
)
from ddlm.data.corpora import Corpus, corpus_names, load_corpus
from ddlm.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Cl100kTokenizer,
    Tokenizer,
    build_tokenizer,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "BPETokenizer",
    "Batch",
    "BlockDataset",
    "BlockLoader",
    "ByteTokenizer",
    "CharTokenizer",
    "Cl100kTokenizer",
    "Corpus",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "corpus_names",
    "encode_documents",
    "fingerprint",
    "load_corpus",
    "load_tokenizer",
    "pad_documents",
    "save_tokenizer",
    "tokenizer_from_dict",
    "wrap_blocks",
]
