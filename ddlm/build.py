"""Assemble the pieces a RunConfig names: tokenizer, datasets, method and backbone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.checkpoint import load_checkpoint, weights_misfit
from ddlm.config import RunConfig
from ddlm.data import BlockDataset, Tokenizer, build_datasets, build_tokenizer, load_corpus, tokenizer_from_dict
from ddlm.errors import CheckpointError
from ddlm.methods.base import Method, method_class


def prepare_data(run: RunConfig, tokenizer: Tokenizer | None = None
                 ) -> tuple[Tokenizer, dict[str, BlockDataset]]:
    """Load the corpus, build (or reuse) the tokenizer, and cut each split into blocks."""
    corpus = load_corpus(run.data.corpus, text8_download=run.data.text8_download,
                         cache_dir=runtime.cache_dir() / "corpora")
    if tokenizer is None:
        train_text = "\n".join(corpus.train) if run.data.tokenizer == "bpe" else None
        tokenizer = build_tokenizer(run.data.tokenizer, train_text, bpe_vocab_size=run.data.bpe_vocab_size)
    datasets = build_datasets(corpus, tokenizer, seq_len=run.data.seq_len, packing=run.data.packing,
                              cache_dir=runtime.cache_dir() / "tokens")
    return tokenizer, datasets


def build_method(run: RunConfig, tokenizer: Tokenizer) -> Method:
    cls = method_class(run.method)
    return cls(run.method_options, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
               bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id, context=run.data.seq_len)


def complete_model_config(run: RunConfig, method: Method, vocab_size: int) -> RunConfig:
    """Fill the fields the model config derives from the tokenizer, data and method."""
    model = dataclasses.replace(run.model, vocab_size=vocab_size, max_len=run.data.seq_len,
                                time_conditioning=method.time_conditioned)
    return dataclasses.replace(run, model=model)


@dataclass
class Loaded:
    """A model ready for evaluation or sampling."""

    run: RunConfig
    tokenizer: Tokenizer
    method: Method
    model: torch.nn.Module
    path: Path
    step: int


def load_for_inference(path: str | Path, device: torch.device | None = None) -> Loaded:
    """Rebuild the run from a checkpoint directory and load its inference weights (safetensors;
    the trainer and its pickled state are never touched)."""
    ckpt = load_checkpoint(path)
    tokenizer = tokenizer_from_dict(ckpt.tokenizer_dict)
    run = ckpt.config
    if run.model.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"checkpoint '{ckpt.path}' has model vocab {run.model.vocab_size} but its "
                              f"tokenizer has {tokenizer.vocab_size}")
    method = build_method(run, tokenizer)
    model = method.build_model(run.model)
    misfit = weights_misfit(model, ckpt.weights)
    if misfit:
        raise CheckpointError(f"checkpoint '{ckpt.path}' weights do not fit its config ({misfit})")
    model.to(device or runtime.device()).eval()
    return Loaded(run, tokenizer, method, model, ckpt.path, ckpt.step)
