"""`ddlm eval` and `ddlm info`: score a checkpoint on a split, describe a checkpoint."""
from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

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
                        overrides: list[str] | None = None, progress: bool = False, zero_shot: bool = False,
                        detokenizer: str | None = None, zero_shot_protocol: str = "mdlm") -> dict:
    """`ddlm eval`: the checkpoint's likelihood on a split of its corpus (or of `data`). With
    `zero_shot`, on corpus `data` prepared as the papers prepare their zero-shot corpora
    (ddlm.eval.zero_shot: `detokenizer` by name or "none", default from the corpus name;
    `zero_shot_protocol` mdlm, sedd or bd3)."""
    from ddlm.distributed import Distributed

    dist = Distributed.from_environment(runtime.device())  # under torchrun: the split sharded over ranks
    try:
        if zero_shot:
            return _evaluate_zero_shot(path, data, split, overrides, progress and dist.is_main, dist,
                                       detokenizer, zero_shot_protocol)
        return _evaluate_checkpoint(path, data, split, overrides, progress and dist.is_main, dist)
    finally:
        dist.close()


def _load_scorable(path, overrides, dist):
    eval_args, method_options = split_sections(overrides or [], "eval")
    loaded = load_for_inference(path, dist.device, method_options=method_options)
    if not loaded.method.has_likelihood:
        raise ConfigError(f"no likelihood for method {loaded.run.method!r}: it defines no bound to evaluate")
    return loaded, eval_args


def _evaluate_zero_shot(path, data, split, overrides, progress, dist, detokenizer, protocol) -> dict:
    from ddlm.eval.zero_shot import evaluate_zero_shot, protocol_named, read_documents

    if not data:
        raise ConfigError("--zero-shot needs --data: the corpus to evaluate on (hf:PATH or a file)")
    protocol_named(protocol)
    loaded, eval_args = _load_scorable(path, overrides, dist)
    cfg = section_config(loaded.run.eval, "eval", {"split": split}, eval_args)
    docs, part = read_documents(data, cfg.split)
    warning = unseen_script_warning(loaded.run, data, cfg.split, texts=docs)
    dtype = runtime.resolve_dtype(loaded.run.train.dtype, dist.device)
    out = evaluate_zero_shot(loaded, data, cfg, dtype=dtype, detokenizer=detokenizer, protocol=protocol,
                             documents=(docs, part), progress=progress, dist=dist)
    if warning:
        out["warning"] = warning
    return out


def _evaluate_checkpoint(path, data, split, overrides, progress, dist) -> dict:
    loaded, eval_args = _load_scorable(path, overrides, dist)
    run = loaded.run
    warning = None
    if data:
        warning = unseen_script_warning(run, data, split or "valid")
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, corpus=data))
    cfg = section_config(run.eval, "eval", {"split": split}, eval_args)
    _, datasets = prepare_data(run, loaded.tokenizer)
    key = "valid" if cfg.split == "validation" else cfg.split
    if len(datasets[key]) == 0:
        raise DataError(f"split {key!r} of corpus {run.data.corpus!r} holds no full sequence")
    dtype = runtime.resolve_dtype(run.train.dtype, dist.device)
    result = evaluate_likelihood(loaded.method, loaded.model, datasets[key], batch_size=cfg.batch_size,
                                 n_samples=cfg.t_samples, max_batches=cfg.max_batches, seed=cfg.seed,
                                 dtype=dtype, progress=progress, dist=dist)
    out = {"method": run.method, "corpus": run.data.corpus, "split": key,
           "tokenizer": run.data.tokenizer, "step": loaded.step, **result.as_dict(),
           "protocol": protocol_text(loaded.method, cfg, result.exact), "checkpoint": str(loaded.path)}
    if warning:
        out["warning"] = warning
    return out


def unseen_script_warning(run, corpus: str, split: str, sample_chars: int = 1_000_000,
                          texts: list[str] | None = None) -> str | None:
    """A line when much of a zero-shot corpus is written in scripts (Unicode blocks of 128 code
    points) that the training corpus never used: a byte-level model still scores it, but the
    figure then measures text of a kind it never saw. `texts`: the corpus's documents, when
    already read (else its split `split` is loaded)."""
    from ddlm.data import load_corpus
    from ddlm.data.prepared import is_prepared

    if is_prepared(run.data.corpus) or is_prepared(corpus):  # token shards: no text to look at
        return None

    def blocks(texts: list[str]) -> tuple[Counter, int]:
        counts = Counter(ord(ch) >> 7 for ch in itertools.islice(itertools.chain.from_iterable(texts), sample_chars))
        return counts, sum(counts.values())

    cache = runtime.cache_dir() / "corpora"
    seen, _ = blocks(load_corpus(run.data.corpus, text8_download=False, cache_dir=cache).train)
    key = "valid" if split == "validation" else split
    if texts is None:
        texts = load_corpus(corpus, text8_download=False, cache_dir=cache).split(key)
    other, total = blocks(texts)
    unseen = sum(n for block, n in other.items() if block not in seen)
    if total and unseen / total > 0.05:
        return (f"{unseen / total:.0%} of the characters of {corpus!r} are in scripts absent from the "
                f"training corpus {run.data.corpus!r}; the model never saw text like it")
    return None


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
        from ddlm.eval.records import read_jsonl

        rows = [row for row in read_jsonl(metrics) if row.get("step", 0) <= loaded.step]
        evals = [row for row in rows if "val_bpc" in row]
        if evals:
            info["valid_bpc"] = round(evals[-1]["val_bpc"], 4)
        info.update(loaded.method.describe_adapted(rows))
    info["config"] = run.to_dict()
    return info


def evaluate_generation(path, *, steps: list[int], top_ps: list[float], num: int, length: int = 0,
                        judges: list[str] = (), seed: int = 0, batch_size: int = 16,
                        prompts: int = 0, prompt_tokens: int = 0, continuation: int = 0,
                        overrides: list[str] | None = None) -> list[dict]:
    """`ddlm eval --generate`: one record per (steps, top-p) setting, plus the conditional record
    when `prompts` > 0 (MAUVE and perplexity under the first judge); each record carries the full
    config, seed and environment."""
    from ddlm.eval.judges import load_judge
    from ddlm.eval.quality import Setting, conditional, held_out_prompts, unconditional
    from ddlm.eval.records import environment

    _, method_options = split_sections(overrides or [], "eval")
    loaded = load_for_inference(path, method_options=method_options)
    loaded_judges = {spec: load_judge(spec) for spec in judges}
    base = {"checkpoint": str(loaded.path), "step": loaded.step, "method": loaded.run.method,
            "config": loaded.run.to_dict(), "seed": seed, "environment": environment()}
    if loaded.run.method == "ar":
        steps = steps[:1]
    records = []
    for n_steps in steps:
        for top_p in top_ps:
            row = unconditional(loaded, Setting(n_steps, top_p), loaded_judges, num=num,
                                length=length or loaded.run.model.max_len, seed=seed, batch_size=batch_size)
            records.append({**base, "kind": "generation", "result": row})
    if prompts:
        if not loaded_judges:
            raise ConfigError("conditional generation needs a judge (--judge ar:DIR or smollm2) for MAUVE")
        _, datasets = prepare_data(loaded.run, loaded.tokenizer)
        seq_len = datasets["test"].seq_len
        prompt_tokens = prompt_tokens or seq_len // 4  # default: a quarter prompt, the rest continued
        continuation = continuation or seq_len - prompt_tokens
        prompt_rows, truths = held_out_prompts(datasets["test"], prompts, prompt_tokens, continuation)
        row = conditional(loaded, prompt_rows, truths, next(iter(loaded_judges.values())),
                          setting=Setting(steps[-1], top_ps[0]), seed=seed, batch_size=batch_size)
        records.append({**base, "kind": "conditional", "result": row})
    return records
