"""Assemble the pieces a RunConfig names: tokenizer, datasets, method and backbone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.checkpoint import load_checkpoint, weights_misfit
from ddlm.config import ModelConfig, RunConfig, make_config
from ddlm.data import BlockDataset, Tokenizer, build_datasets, build_tokenizer, load_corpus, tokenizer_from_dict
from ddlm.errors import CheckpointError, ConfigError
from ddlm.methods.base import Method, method_class, method_names


def prepare_data(run: RunConfig, tokenizer: Tokenizer | None = None
                 ) -> tuple[Tokenizer, dict[str, BlockDataset]]:
    """Load the corpus, build (or reuse) the tokenizer, and cut each split into blocks. A prepared
    corpus (`prepared:DIR`, or a directory holding index.json: `ddlm data prepare`) is read in place,
    its rows memory-mapped, with the tokenizer it was prepared with."""
    from ddlm.data.prepared import is_prepared, prepared_datasets

    directory = is_prepared(run.data.corpus)
    if directory is not None:
        return prepared_datasets(directory, run.data, tokenizer)
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
    method = cls(run.method_options, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                 bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id, context=run.data.seq_len)
    if run.model.output_vocab:
        method.set_never_emitted(range(run.model.output_vocab, tokenizer.vocab_size))
    return method


def complete_model_config(run: RunConfig, method: Method, vocab_size: int) -> RunConfig:
    """Fill the fields the model config derives from the tokenizer, data and method."""
    model = dataclasses.replace(run.model, vocab_size=vocab_size, max_len=run.data.seq_len,
                                time_conditioning=method.time_conditioned)
    return dataclasses.replace(run, model=model)


def estimated_bytes(model: ModelConfig, *, training: bool) -> int:
    """Memory the weights need in float32: per block attention 4 D^2 and MLP 2 r D^2, the
    adaLN modulation 6 D C, the embedding and head 2 V D; training adds gradients, two AdamW
    moments and the EMA (5x)."""
    d, hidden = model.dim, int(model.mlp_ratio * model.dim)
    per_block = 4 * d * d + 2 * d * hidden + 6 * d * model.cond_dim
    params = model.n_layers * per_block + 2 * max(model.vocab_size, 1) * d
    return params * 4 * (5 if training else 1)


def check_memory(model: ModelConfig, *, training: bool) -> None:
    """Refuse, before allocating, a model whose weights (and optimizer state) exceed the machine's
    memory, with the estimate in the message."""
    need = estimated_bytes(model, training=training)
    have = runtime.memory_bytes()
    if have and need > have:
        raise ConfigError(f"model d={model.dim} layers={model.n_layers} vocab={model.vocab_size} needs about "
                          f"{need / 2**30:,.1f} GiB for its weights{' and optimizer state' if training else ''}; "
                          f"this machine has {have / 2**30:,.1f} GiB")


@dataclass
class Loaded:
    """A model ready for evaluation or sampling."""

    run: RunConfig
    tokenizer: Tokenizer
    method: Method
    model: torch.nn.Module
    path: Path
    step: int


def load_for_inference(path: str | Path, device: torch.device | None = None, *,
                       method_options: dict[str, str] | None = None) -> Loaded:
    """Rebuild the run from a checkpoint directory and load its inference weights (safetensors;
    the trainer and its pickled state are never touched). `method_options` ({'edlm.k': '8'}, from
    `--<method>.<field>=value` at sample or eval time) change the run's method options, or wrap
    its method in one that declares it can (EDLM around an MDLM run)."""
    ckpt = load_checkpoint(path)
    tokenizer = tokenizer_from_dict(ckpt.tokenizer_dict)
    run = with_method_options(ckpt.config, method_options or {})
    if run.model.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"checkpoint '{ckpt.path}' has model vocab {run.model.vocab_size} but its "
                              f"tokenizer has {tokenizer.vocab_size}")
    check_memory(run.model, training=False)
    method = build_method(run, tokenizer)
    method.load_parts(load_for_inference, tokenizer)
    model = method.build_model(run.model)
    weights = method.adopt_weights(model, ckpt.weights, ckpt.config.method)
    misfit = weights_misfit(model, weights)
    if misfit:
        raise CheckpointError(f"checkpoint '{ckpt.path}' weights do not fit its config ({misfit})")
    model.to(device or runtime.device()).eval()
    return Loaded(run, tokenizer, method, model, ckpt.path, ckpt.step)


def with_method_options(run: RunConfig, options: dict[str, str]) -> RunConfig:
    """`run` with `--<method>.<field>=value` options applied: the run's own method's, or those of
    a method whose `wraps` names the run's method (it starts from the run's method options)."""
    if not options:
        return run
    sections = {key.partition(".")[0] for key in options}
    if len(sections) > 1:
        raise ConfigError(f"options of several methods given ({', '.join(sorted(sections))}); give one")
    (name,) = sections
    if name not in method_names():
        raise ConfigError(f"option --{next(iter(options))} does not apply here; use --sample.<field>, "
                          f"--eval.<field> or --{run.method}.<field>")
    fixed = [key for key in options if key.partition(".")[2] not in method_class(name).sample_options]
    if fixed:
        allowed = method_class(name).sample_options
        raise ConfigError(f"option --{fixed[0]} is fixed by training; " + (
            f"at sample or eval time only {', '.join(allowed)} can change" if allowed
            else f"method {name!r} has no options to change at sample or eval time"))
    base = run.to_dict()
    if name != run.method:
        if run.method not in method_class(name).wraps:
            raise ConfigError(f"--{name}.* options do not apply to a {run.method!r} checkpoint")
        base[name] = carried_options(base.pop(run.method), name)
        base["method"] = name
    return make_config(base=base, overrides=options)


def carried_options(options: dict, method: str) -> dict:
    """The fields of one method's options that `method`'s config class also has."""
    names = {f.name for f in dataclasses.fields(method_class(method).config_class)}
    return {k: v for k, v in options.items() if k in names}


def init_base(path: str | Path, method: str | None) -> dict:
    """The config a run started with `--init PATH` inherits: the data and model sections of that
    checkpoint, and its method options that `method` also has (so an MDLM run's schedule and time
    conditioning carry over to BD3-LM or EDLM)."""
    old = load_checkpoint(path).config.to_dict()
    method = method or old["method"]
    method_class(method)  # an unknown name is a one-line error here
    return {"method": method, "data": old["data"], "model": old["model"],
            method: carried_options(old.get(old["method"], {}), method)}
