"""`ddlm eval` and `ddlm info`: score a checkpoint on a split, describe a checkpoint."""
from __future__ import annotations

import dataclasses
import json

from ddlm import runtime
from ddlm.build import load_for_inference, prepare_data
from ddlm.config import EvalConfig, section_config, split_sections
from ddlm.errors import ConfigError, DataError
from ddlm.eval.likelihood import evaluate_likelihood


def protocol_text(method, cfg: EvalConfig, exact: bool) -> str:
    if exact:
        return "exact NLL, every token of each block scored, tokens counted over the split"
    return (f"{method.name} {method.bound_name} with {cfg.t_samples} t-sample(s) per sequence, "
            f"stratified over the batch; every token counted; float64 sums over the split")


def evaluate_checkpoint(path, *, data: str | None = None, split: str | None = None,
                        overrides: list[str] | None = None, progress: bool = False) -> dict:
    eval_args, method_options = split_sections(overrides or [], "eval")
    loaded = load_for_inference(path, method_options=method_options)
    run = loaded.run
    if not loaded.method.has_likelihood:
        raise ConfigError(f"no likelihood for method {run.method!r}: it defines no bound to evaluate")
    if data:
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, corpus=data))
    cfg = section_config(run.eval, "eval", {"split": split}, eval_args)
    _, datasets = prepare_data(run, loaded.tokenizer)
    key = "valid" if cfg.split == "validation" else cfg.split
    if len(datasets[key]) == 0:
        raise DataError(f"split {key!r} of corpus {run.data.corpus!r} holds no full sequence")
    dtype = runtime.resolve_dtype(run.train.dtype)
    result = evaluate_likelihood(loaded.method, loaded.model, datasets[key], batch_size=cfg.batch_size,
                                 n_samples=cfg.t_samples, max_batches=cfg.max_batches, seed=cfg.seed,
                                 dtype=dtype, progress=progress)
    return {"method": run.method, "corpus": run.data.corpus, "split": key,
            "tokenizer": run.data.tokenizer, "step": loaded.step, **result.as_dict(),
            "protocol": protocol_text(loaded.method, cfg, result.exact), "checkpoint": str(loaded.path)}


def checkpoint_info(path) -> dict:
    loaded = load_for_inference(path)
    run = loaded.run
    info = {"checkpoint": str(loaded.path), "method": run.method, "step": loaded.step,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "model": f"d={run.model.dim} layers={run.model.n_layers} heads={run.model.n_heads} "
                     f"context={run.model.max_len} block={run.model.block} "
                     f"time_conditioning={run.model.time_conditioning}",
            "options": ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(run.method_options).items()) or "none",
            "tokenizer": f"{loaded.tokenizer.name} (vocab {loaded.tokenizer.vocab_size})",
            "corpus": run.data.corpus}
    metrics = loaded.path.parent.parent / "metrics.jsonl"
    if metrics.is_file():
        evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"val_bpc"' in line]
        evals = [e for e in evals if e["step"] <= loaded.step]
        if evals:
            info["valid_bpc"] = round(evals[-1]["val_bpc"], 4)
    info["config"] = run.to_dict()
    return info
