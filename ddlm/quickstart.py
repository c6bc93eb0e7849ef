"""`ddlm quickstart`: train small AR and MDLM models on the embedded Austen corpus, then show
their samples side by side with their test BPC and the share of their words that are words of the
training text (held-out text scores about 99%). A few minutes on 2 CPU cores.

The tokenizer is a 2,048-token BPE trained on the training split (about 3.3 characters a token).
With characters, MDLM must learn spelling from every order of context at once, and at this budget
its samples are letter soup (about 28% known words against AR's 70%); BPE tokens carry the
spelling, and each step trains on three times the text. `--data.tokenizer=char` runs the
character-level version."""
from __future__ import annotations

import textwrap
from pathlib import Path

from ddlm import runtime
from ddlm.config import make_config, parse_overrides
from ddlm.data.corpora import load_corpus
from ddlm.eval.generation import known_word_rate, words
from ddlm.commands.evaluate import evaluate_checkpoint
from ddlm.commands.sample import sample_checkpoint
from ddlm.train.loop import train

QUICKSTART = {
    "data": {"corpus": "austen", "tokenizer": "bpe", "bpe_vocab_size": 2048, "seq_len": 128},
    "model": {"dim": 256, "n_layers": 4, "n_heads": 4},
    "train": {"steps": 500, "batch_size": 16, "lr": 1e-3, "beta2": 0.95, "warmup_steps": 50,
              "eval_every": 200, "eval_batches": 4, "ckpt_every": 200, "ema": 0.99},
    "eval": {"max_batches": 20, "batch_size": 32},
    "sample": {"num": 16, "steps": 128},
}
# The character-level configuration of the benchmarks and of the comparison with the public code.
CHAR_QUICKSTART = {**QUICKSTART, "data": {"corpus": "austen", "tokenizer": "char", "seq_len": 128}}
SHOWN_SAMPLES = 2


def quickstart(*, out: str = "runs/quickstart", steps: int | None = None,
               methods: list[str] | None = None, overrides: list[str] | None = None,
               quiet: bool = False) -> dict:
    extra = parse_overrides(overrides or [])
    if steps:
        extra["train.steps"] = str(steps)
    from ddlm.methods.base import method_names

    report, words_of = {}, None
    for method in methods or [m for m in ("ar", "mdlm") if m in method_names()]:
        run = make_config(base={**QUICKSTART, "method": method}, overrides=extra)
        if not quiet:
            print(f"== {method}: d={run.model.dim} layers={run.model.n_layers} L={run.data.seq_len} "
                  f"steps={run.train.steps} on {run.data.corpus} ({run.data.tokenizer})")
        result = train(run, Path(out) / method, quiet=quiet)
        if result.interrupted:  # SIGINT/SIGTERM: this run is checkpointed; nothing runs after it
            if not quiet:
                print(f"== {method} interrupted at step {result.step}; checkpoint {result.checkpoint}; "
                      f"the same command resumes it")
            raise KeyboardInterrupt  # `ddlm` exits with status 130, as an interrupted `ddlm train`
        test = evaluate_checkpoint(result.out_dir, split="test")
        samples = sample_checkpoint(result.out_dir, options={"length": run.data.seq_len})
        if words_of is None:
            words_of = WordReference(run, chars=len(samples["texts"][0]))
        report[method] = {"test_bpc": test["bpc"], "test_bpc_stderr": test["bpc_stderr"],
                          "exact": test["exact"], "tokens_per_second": result.tokens_per_second,
                          "dtype": result.dtype, "steps": result.step, "nfe": samples["nfe"],
                          "known_words": known_word_rate(samples["texts"], words_of.lexicon),
                          "held_out_known_words": words_of.held_out_rate,
                          "samples": samples["texts"], "out": str(result.out_dir)}
    if not quiet:
        print_report(report)
    return report


class WordReference:
    """The words of a run's training split (`lexicon`), and the known-word rate of held-out text:
    windows of `chars` characters spread evenly over the test split (`held_out_rate`)."""

    def __init__(self, run, *, chars: int, windows: int = 200) -> None:
        corpus = load_corpus(run.data.corpus, text8_download=False, cache_dir=runtime.cache_dir() / "corpora")
        self.lexicon = {w for doc in corpus.split("train") for w in words(doc)}
        test = " ".join(corpus.split("test"))
        starts = range(0, max(1, len(test) - chars), max(1, (len(test) - chars) // windows))
        self.held_out_rate = known_word_rate([test[i:i + chars] for i in starts], self.lexicon)


def print_report(report: dict) -> None:
    print("\nmethod  steps  test BPC            train tok/s  dtype   sampling NFE  known words")
    for method, r in report.items():
        bound = "=" if r["exact"] else "<="
        print(f"{method:<7} {r['steps']:>5}  {bound} {r['test_bpc']:.3f} ± {r['test_bpc_stderr']:.3f}"
              f"   {r['tokens_per_second']:>11,.0f}  {r['dtype']:<6}  {r['nfe']:>12}  {r['known_words']:>11.0%}")
    held_out = next(iter(report.values()))["held_out_known_words"]
    print(f"sampling NFE: network calls for all {max(len(r['samples']) for r in report.values())} samples, "
          f"drawn as one batch; known words: share of the samples' words found in the training text "
          f"(held-out text: {held_out:.0%})")
    for i in range(min(SHOWN_SAMPLES, max(len(r["samples"]) for r in report.values()))):
        print(f"\n--- sample {i} ---")
        for method, r in report.items():
            if i < len(r["samples"]):
                body = textwrap.fill(r["samples"][i], width=96, initial_indent=f"{method:>5} | ",
                                     subsequent_indent="      | ")
                print(body)
