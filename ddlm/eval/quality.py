"""Generation quality, measured the same way for every method (docs/methods.md §7).

    unconditional(loaded, setting, judges)      samples from nothing at one (steps, top-p) setting:
                                                gen PPL and bits per byte under each judge, unigram
                                                entropy, distinct-n, repetition, NFE, seconds/sample
    conditional(loaded, prompts, truths, judge) continuations of held-out prompts: MAUVE against the
                                                true continuations (judge features) and the judge's
                                                perplexity of them given the prompt
    held_out_prompts(dataset, n, k, length)     prompts and true continuations from a split

Samples are cut at their first EOS (the rest is another document) before they are decoded and
judged; a cut sample has the judge's own end token scored after it.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ddlm.config import SampleConfig
from ddlm.errors import ConfigError
from ddlm.eval.generation import cut_at_eos, judge_nll, repetition_rate, sample_statistics, unigram_entropy
from ddlm.sampling.base import model_device


@dataclass(frozen=True)
class Setting:
    """One generation setting: denoising steps (ignored by AR) and nucleus mass (1.0: off)."""

    steps: int
    top_p: float = 1.0
    sample: dict = dataclasses.field(default_factory=dict)  # other SampleConfig fields (e.g. the sampler)

    @property
    def label(self) -> str:
        return f"T={self.steps}" + (f", top-p {self.top_p:g}" if self.top_p < 1 else "")


@dataclass
class Draw:
    rows: list[list[int]]  # new tokens of each sample, cut at the first EOS
    ended: list[bool]
    texts: list[str]
    nfe: float  # network evaluations per batch, averaged over batches
    seconds: float  # wall time of all draws


def draw(loaded, cfg: SampleConfig, num: int, length: int, *,
         prompts: torch.Tensor | None = None) -> Draw:
    """`num` samples of `length` new tokens (after `prompts` (num, k) when given) in batches of
    cfg.batch_size, with one generator seeded by cfg.seed."""
    sampler = loaded.method.sampler(cfg)
    device = model_device(loaded.model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rows, nfes, seconds = [], [], 0.0
    skip = 0 if prompts is None else prompts.shape[1]
    for start in range(0, num, cfg.batch_size):
        n = min(cfg.batch_size, num - start)
        prompt = None if prompts is None else prompts[start:start + n]
        t0 = time.perf_counter()
        gen = sampler.generate(loaded.model, n, length, prompt=prompt, generator=generator)
        seconds += time.perf_counter() - t0
        ends = gen.lengths.tolist() if gen.lengths is not None else [gen.tokens.shape[1]] * n
        rows.extend(row[skip:end] for row, end in zip(gen.tokens.tolist(), ends))
        nfes.append(gen.nfe)
    rows, ended = cut_at_eos(rows, loaded.tokenizer.eos_id)
    return Draw(rows=rows, ended=ended, texts=[loaded.tokenizer.decode(r) for r in rows],
                nfe=sum(nfes) / len(nfes), seconds=seconds)


def sample_config(loaded, setting: Setting, *, seed: int, batch_size: int, **fields) -> SampleConfig:
    cfg = dataclasses.replace(loaded.run.sample, steps=setting.steps, top_p=setting.top_p, seed=seed,
                              batch_size=batch_size, num=1, **fields)
    if setting.sample:
        from ddlm.config import section_config

        cfg = section_config(cfg, "sample", {}, [f"--sample.{k}={v}" for k, v in setting.sample.items()])
    return cfg


def unconditional(loaded, setting: Setting, judges: dict, *, num: int, length: int, seed: int = 0,
                  batch_size: int = 16) -> dict:
    """One row of the unconditional table (see the module docstring). Every sample is kept, with
    its own statistics (`per_sample`) and judge scores (`judges[name]["per_text"]`), so every
    figure can be recomputed and bootstrapped."""
    if length < 1 or length > loaded.run.model.max_len:
        raise ConfigError(f"generation length {length} must be within the context of "
                          f"{loaded.run.model.max_len} tokens")
    cfg = sample_config(loaded, setting, seed=seed, batch_size=batch_size)
    out = draw(loaded, cfg, num, length)
    stats = sample_statistics([r for r in out.rows if r] or [[]]).as_dict()
    row = {"steps": setting.steps, "top_p": setting.top_p, "num": num, "length": length,
           "nfe": out.nfe, "seconds_per_sample": out.seconds / num,
           "tokens_per_second": num * length / out.seconds if out.seconds else float("nan"),
           "ended_early": sum(out.ended), "mean_tokens": sum(map(len, out.rows)) / num, **stats,
           "samples": out.texts, "per_sample": per_sample_statistics(out.rows)}
    row["judges"] = {name: judge_nll(judge, out.texts, ended=out.ended).as_dict()
                     for name, judge in judges.items()}
    return row


def mauve_bootstrap(p_features, q_features, replicates: int, *, seed: int = 0) -> list[float]:
    """MAUVE of `replicates` resamples (with replacement) of the generated side's features."""
    import numpy as np

    from ddlm.eval.mauve import mauve_score

    rng = np.random.default_rng(seed)
    return [mauve_score(p_features[rng.integers(0, len(p_features), len(p_features))], q_features, seed=seed)
            for _ in range(replicates)]


def per_sample_statistics(rows: list[list[int]]) -> dict:
    """Each sample's unigram entropy (nats), 4-gram repetition rate and length in tokens."""
    return {"unigram_entropy": [unigram_entropy(r) for r in rows],
            "repetition": [repetition_rate(r) for r in rows], "tokens": [len(r) for r in rows]}


def held_out_text(tokenizer, dataset, judge, *, num: int, length: int) -> dict:
    """The judge's scores (and the sample statistics) of `num` held-out texts of `length` tokens:
    what the generated samples are measured against."""
    _, truths = held_out_prompts(dataset, min(num, len(dataset)), 0, length)
    rows, ended = cut_at_eos(truths.tolist(), tokenizer.eos_id)
    texts = [tokenizer.decode(r) for r in rows]
    return {"num": len(texts), "length": length, "judge": judge.name,
            "score": judge_nll(judge, texts, ended=ended).as_dict(), "per_sample": per_sample_statistics(rows)}


def held_out_prompts(dataset, n: int, prompt_tokens: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) prompts and (n, length) true continuations: the first k + length tokens of n
    sequences spread evenly over the split (deterministic)."""
    if prompt_tokens + length > dataset.seq_len:
        raise ConfigError(f"prompt ({prompt_tokens}) + continuation ({length}) tokens exceed the "
                          f"sequence length {dataset.seq_len}")
    if len(dataset) < n:
        raise ConfigError(f"the split holds {len(dataset)} sequences; {n} prompts asked")
    picks = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    seqs = torch.as_tensor(dataset.tokens[picks, :prompt_tokens + length], dtype=torch.long)
    return seqs[:, :prompt_tokens].clone(), seqs[:, prompt_tokens:].clone()


def conditional(loaded, prompts: torch.Tensor, truths: torch.Tensor, judge, *, setting: Setting,
                seed: int = 0, batch_size: int = 16, reference: dict | None = None,
                mauve_replicates: int = 20) -> dict:
    """Continue each prompt by len(truth) tokens; MAUVE (judge features) against the true
    continuations and the judge's perplexity of the continuations given their prompts.
    `reference` caches the true side ({'features', 'score'}) across methods. MAUVE is also
    computed on `mauve_replicates` bootstrap resamples of the continuations (its error bar)."""
    from ddlm.eval.mauve import featurize, mauve_score

    tok = loaded.tokenizer
    cfg = sample_config(loaded, setting, seed=seed, batch_size=batch_size)
    out = draw(loaded, cfg, len(prompts), truths.shape[1], prompts=prompts)
    prompt_texts = [tok.decode(p) for p in prompts.tolist()]
    if reference is None or "features" not in reference:
        true_rows, true_ended = cut_at_eos(truths.tolist(), tok.eos_id)
        true_texts = [tok.decode(r) for r in true_rows]
        reference = {} if reference is None else reference
        reference["features"] = featurize(judge, true_texts)
        reference["score"] = judge_nll(judge, true_texts, ended=true_ended, prompts=prompt_texts).as_dict()
    score = judge_nll(judge, out.texts, ended=out.ended, prompts=prompt_texts).as_dict()
    features = featurize(judge, out.texts)
    return {"steps": setting.steps, "top_p": setting.top_p, "prompts": len(prompts),
            "prompt_tokens": prompts.shape[1], "length": truths.shape[1], "nfe": out.nfe,
            "seconds_per_sample": out.seconds / len(prompts), "judge": judge.name,
            "mauve": mauve_score(features, reference["features"], seed=seed),
            "mauve_bootstrap": mauve_bootstrap(features, reference["features"], mauve_replicates, seed=seed),
            "gen_ppl": score["gen_ppl"], "bits_per_byte": score["bits_per_byte"],
            "per_text": score["per_text"],
            "reference_gen_ppl": reference["score"]["gen_ppl"],
            "reference_bits_per_byte": reference["score"]["bits_per_byte"],
            "prompt_texts": prompt_texts, "samples": out.texts}
