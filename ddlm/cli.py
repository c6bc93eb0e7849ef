"""`ddlm` command line: one table of subcommands, each a plain function.

Dotted options (`--model.dim=256`, `--train.steps 500`, `--mdlm.schedule=cosine`) override any
config field; `--config recipe.yaml` loads a recipe first. `--json` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ddlm.errors import DdlmError

OVERRIDE_HELP = ("Any config field can be set as --section.field=value, e.g. --model.dim=256 "
                 "--train.steps=500 --data.seq_len=128 --mdlm.schedule=cosine.")


def _emit(payload: dict, as_json: bool, text: str) -> None:
    print(json.dumps(payload) if as_json else text)


# -- train ----------------------------------------------------------------------------------
def cmd_train(args, extra: list[str]) -> int:
    from ddlm.config import make_config, parse_overrides
    from ddlm.train.loop import train

    overrides = parse_overrides(extra)
    for flag, key in ((args.method, "method"), (args.data, "data.corpus"),
                      (args.tokenizer, "data.tokenizer"), (args.steps, "train.steps"),
                      (args.init, "train.init")):
        if flag is not None:
            overrides[key] = str(flag)
    if args.json:
        overrides.setdefault("train.progress", "false")
    base = None
    if overrides.get("train.init"):  # the data and model of the run it starts from, unless overridden
        from ddlm.build import init_base
        from ddlm.checkpoint import resolve_checkpoint

        base = init_base(resolve_checkpoint(overrides["train.init"]), overrides.get("method"))
    run = make_config(recipe=args.config, overrides=overrides, base=base)
    result = train(run, args.out, overwrite=args.overwrite, quiet=args.json)
    if not result.main:  # under torchrun rank 0 alone reports
        return 130 if result.interrupted else 0
    payload = {"out": str(result.out_dir), "checkpoint": str(result.checkpoint), "step": result.step,
               "interrupted": result.interrupted, "dtype": result.dtype,
               "tokens_per_second": result.tokens_per_second, "seconds": result.seconds,
               "valid": result.valid}
    valid = result.valid or {}
    score = f"valid BPC {valid['val_bpc']:.4f}" if "val_bpc" in valid \
        else f"valid loss {valid.get('val_loss', float('nan')):.4f}"
    state = "interrupted at" if result.interrupted else "finished"
    _emit(payload, args.json, f"{state} step {result.step}: {score} "
                              f"({result.tokens_per_second:,.0f} tok/s, {result.dtype}); "
                              f"checkpoint {result.checkpoint}")
    return 130 if result.interrupted else 0  # an interrupted run is not a finished one


# -- eval -----------------------------------------------------------------------------------
def cmd_eval(args, extra: list[str]) -> int:
    from ddlm.eval.records import append_jsonl, check_appendable, environment
    from ddlm.commands.evaluate import evaluate_checkpoint

    if args.results:  # checked before evaluating; written after the result is printed, so it is never lost
        check_appendable(args.results)
    if args.generate:
        return eval_generation(args, extra)
    if args.infill_test is not None:
        return eval_infill(args, extra)
    if (args.detokenizer or args.protocol) and not args.zero_shot:
        raise DdlmError("--detokenizer and --protocol apply to --zero-shot evaluation")
    if args.zero_shot and not args.data:
        raise DdlmError("--zero-shot needs --data hf:PATH | FILE: the corpus to evaluate on")
    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, overrides=extra,
                                 progress=not args.json, zero_shot=args.zero_shot, detokenizer=args.detokenizer,
                                 zero_shot_protocol=args.protocol or "mdlm")
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone reports
        return 0
    text = (f"{result['method']} on {result['corpus']} [{result['split']}]: "
            f"BPC {result['bpc']:.4f} ± {result['bpc_stderr']:.4f}  PPL {result['ppl']:.3f}  "
            f"tokens {result['tokens']:,}  ({result['protocol']})")
    if result.get("warning"):
        print(f"ddlm: warning: {result['warning']}", file=sys.stderr)
    _emit(result, args.json, text)
    if args.results:
        sys.stdout.flush()
        append_jsonl(args.results, {"kind": "likelihood", "result": result, "environment": environment()})
    return 0


def eval_infill(args, extra: list[str]) -> int:
    from ddlm.eval.infill_test import infill_test

    if extra:
        raise DdlmError(f"--infill-test takes no option {extra[0]}")
    result = infill_test(args.checkpoint, n=args.infill_test, span=args.infill_span, t_samples=args.infill_samples,
                         seed=args.seed, split=args.split or "test", progress=not args.json)
    _emit(result, args.json, f"{result['method']} fills {result['sequences']} spans of {result['span']} tokens: "
                             f"{result['bpc']:.4f} ± {result['bpc_stderr']:.4f} bits per character "
                             f"({result['protocol']})")
    return 0


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DdlmError(f"{flag} {text!r} must be comma-separated numbers") from None
    if not values:
        raise DdlmError(f"{flag} is empty")
    return values


def eval_generation(args, extra: list[str]) -> int:
    from ddlm.eval.records import append_jsonl
    from ddlm.commands.evaluate import evaluate_generation
    from ddlm.methods.base import method_class

    steps = _numbers(args.gen_steps, int, "--gen-steps")
    top_ps = _numbers(args.top_p, float, "--top-p")
    if any(s < 1 for s in steps) or any(not 0 < p <= 1 for p in top_ps) or args.num < 1:
        raise DdlmError("--gen-steps and --num must be positive and --top-p in (0, 1]")
    records = evaluate_generation(args.checkpoint, steps=steps, top_ps=top_ps, num=args.num,
                                  length=args.length or 0, judges=args.judge or [], seed=args.seed,
                                  prompts=args.conditional, overrides=extra)
    for record in records:
        r = record["result"]
        if args.json:
            print(json.dumps({k: v for k, v in record.items() if k not in ("config", "environment")}))
        elif record["kind"] == "conditional":
            print(f"conditional T={r['steps']}: MAUVE {r['mauve']:.3f} ({r['judge']} features), "
                  f"gen PPL {r['gen_ppl']:.2f}, {r['bits_per_byte']:.3f} bits/byte "
                  f"(true continuations {r['reference_gen_ppl']:.2f}, {r['reference_bits_per_byte']:.3f})")
        else:
            judged = "".join(f"; {name}: gen PPL {j['gen_ppl']:.2f}, {j['bits_per_byte']:.3f} bits/byte"
                             for name, j in r["judges"].items())
            setting = f"T={r['steps']}" if method_class(record["method"]).has_steps else record["method"].upper()
            print(f"{setting} top-p {r['top_p']:g}: NFE {r['nfe']:.0f}, {r['seconds_per_sample']:.3f} "
                  f"s/sample, entropy {r['unigram_entropy']:.3f}, distinct-4 {r['distinct'][4]:.3f}, "
                  f"repetition {r['repetition']:.3f}{judged}")
    if args.results:  # after printing: a failed write loses no result
        sys.stdout.flush()
        append_jsonl(args.results, *records)
    return 0


# -- sample ---------------------------------------------------------------------------------
def cmd_sample(args, extra: list[str]) -> int:
    from ddlm.commands.sample import sample_checkpoint

    for flag, value in (("--num", args.num), ("--length", args.length)):
        if value is not None and value < 1:
            raise DdlmError(f"{flag} {value} must be at least 1")
    overrides = {"num": args.num, "length": args.length, "seed": args.seed, "steps": args.steps,
                 "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                 "sampler": args.sampler, "cache": None if not args.no_cache else False}
    if args.out:
        check_writable_file(args.out)
    if args.show_html:
        check_writable_file(args.show_html, "--show-html", "writing.html")
    watch = Watch(args.show, args.show_html, stream=sys.stderr if args.json else sys.stdout)
    result = sample_checkpoint(args.checkpoint, prompt=args.prompt, options=overrides, extra=extra,
                               judge=args.judge, infill=args.infill, recorder=watch.recorder, on_load=watch.loaded)
    watch.write_page(result)
    if "note" in result and not args.json:
        print(f"ddlm: note: {result['note']}", file=sys.stderr)
    if args.out:
        lines = [json.dumps({"index": i, "text": text, "tokens": result["tokens"][i]}) + "\n"
                 for i, text in enumerate(result["texts"])]
        from ddlm.commands.sample import write_output

        write_output(args.out, "".join(lines))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))
    else:
        for i, text in enumerate(result["texts"]):
            print(f"--- sample {i} ---\n{text}")
        lengths = result["lengths"]
        print(f"[{result['method']}, {result['sampler']}: {result['nfe']} NFE, "
              f"{result['seconds']:.2f} s for {len(result['texts'])} samples; length min "
              f"{lengths['min']} / median {lengths['median']} / max {lengths['max']} tokens; unigram "
              f"entropy {result['statistics']['unigram_entropy']:.3f} nats]")
        if "judge" in result:
            j = result["judge"]
            print(f"[judge {j['name']}: gen PPL {j['gen_ppl']:.2f} over {j['tokens']} tokens, "
                  f"{j['bits_per_byte']:.3f} bits per byte]")
    return 0


class Watch:
    """--show (the terminal, live) and --show-html FILE (a page written after the draw)."""

    def __init__(self, show: bool, html_path: str | None, stream=None) -> None:
        from ddlm.sampling.trace import Recorder

        self.show, self.html_path, self.stream = show, html_path, stream  # --json keeps stdout for the JSON
        self.recorder = Recorder() if show or html_path else None
        self.tokenizer = self.cfg = None

    def loaded(self, loaded, cfg) -> None:
        self.tokenizer, self.cfg = loaded.tokenizer, cfg
        if self.show:
            from ddlm.viewer.terminal import TerminalView

            self.recorder.on_frame = TerminalView(loaded.tokenizer, title=f"ddlm sample · {loaded.run.method}",
                                                  stream=self.stream)

    def write_page(self, result: dict) -> None:
        if not self.html_path:
            return
        from ddlm.viewer.frames import merge_draws, timeline
        from ddlm.viewer.html import write_page

        meta = {"method": result["method"], "sampler": result["sampler"], "steps": result["steps"],
                "samples": len(result["texts"]), "NFE": result["nfe"], "seconds": f"{result['seconds']:.2f}",
                "seed": self.cfg.seed, "top-p": self.cfg.top_p, "temperature": self.cfg.temperature,
                "checkpoint": result["checkpoint"]}
        if "infill" in result:
            meta["infill"] = result["infill"]["text"]
        write_page(self.html_path, timeline(merge_draws(self.recorder.draws)), self.tokenizer,
                   title=f"ddlm · {result['method']} writing", meta=meta)


# -- compare --------------------------------------------------------------------------------
def cmd_compare(args, extra: list[str]) -> int:
    from ddlm.compare.runner import compare

    if extra:
        raise_unexpected(extra)
    out = args.out or f"runs/compare-{Path(args.recipe).stem}" + (f"-{args.scale}" if args.scale else "")
    results = compare(args.recipe, out, quiet=args.json, scale=args.scale)
    if results is None:  # under torchrun rank 0 alone reports
        return 0
    payload = {"out": out, "report": str(Path(out) / "report.md"), "rows": len(results["rows"])}
    if "scale" in results:
        payload["scale"] = results["scale"]
    if "processes" in results:
        payload["processes"] = results["processes"]
    _emit(payload, args.json,
          f"report: {Path(out) / 'report.md'} ({len(results['rows'])} rows); results: {Path(out) / 'results.json'}")
    return 0


def raise_unexpected(extra: list[str]) -> None:
    raise DdlmError(f"unexpected argument {extra[0]!r}; the recipe holds every setting")


def check_writable_file(path: str, flag: str = "--out", example: str = "samples.jsonl") -> None:
    """`flag` must name a file in an existing directory (checked before any work is done)."""
    target = Path(path)
    if target.is_dir():
        raise DdlmError(f"{flag} '{path}' is a directory; name a file such as {example}")
    if not target.parent.is_dir():
        raise DdlmError(f"{flag} '{path}': directory '{target.parent}' does not exist")


# -- info -----------------------------------------------------------------------------------
def cmd_info(args, extra: list[str]) -> int:
    from ddlm.commands.evaluate import checkpoint_info

    info = checkpoint_info(args.checkpoint)
    lines = [f"{k}: {v}" for k, v in info.items() if k != "config"]
    _emit(info, args.json, "\n".join(lines))
    return 0


# -- quickstart -----------------------------------------------------------------------------
def cmd_quickstart(args, extra: list[str]) -> int:
    from ddlm.quickstart import quickstart

    methods = args.methods.split(",") if args.methods else None
    report = quickstart(out=args.out, steps=args.steps, methods=methods,
                        overrides=extra, quiet=args.json)
    if args.json:
        print(json.dumps(report))
    return 0


# -- data -----------------------------------------------------------------------------------
def cmd_data(args, extra: list[str]) -> int:
    from ddlm.data.prepare import prepare_corpus

    if extra:
        raise DdlmError(f"unexpected argument {extra[0]!r} (see ddlm data --help)")
    if args.source is None or args.tokenizer is None or args.out is None:
        raise DdlmError("data prepare needs SOURCE, --tokenizer and --out (see ddlm data --help)")
    report = prepare_corpus(args.source, args.tokenizer, args.out, workers=args.workers, packing=args.packing,
                            seq_len=args.seq_len, align=args.align, shard_tokens=args.shard_tokens,
                            overwrite=args.overwrite, progress=not args.json, bpe_vocab_size=args.bpe_vocab_size)
    splits = ", ".join(f"{name} {s['tokens']:,} tokens ({s['shards']} shard{'s' * (s['shards'] != 1)})"
                       for name, s in report["splits"].items())
    _emit(report, args.json, f"prepared {report['source']} with {report['tokenizer']} into {report['out']}: "
                             f"{splits}; {report['tokens_per_second']:,.0f} tok/s with {report['workers']} "
                             f"worker{'s' * (report['workers'] != 1)}; train with --data.corpus "
                             f"prepared:{report['out']} --data.tokenizer {report['tokenizer']}")
    return 0


# -- interop --------------------------------------------------------------------------------
def cmd_import(args, extra: list[str]) -> int:
    from ddlm.interop.import_ import import_model

    if extra:
        raise DdlmError(f"import takes no option {extra[0]}")
    report = import_model(args.source, args.out, method=args.method, overwrite=args.overwrite)
    size = report["model"]
    _emit(report, args.json, f"imported {report['architecture']} from {report['source']} as a {report['method']} "
                             f"run ({size['n_layers']} layers, dim {size['dim']}, {report['parameters']:,} "
                             f"parameters, {report['tokenizer']} tokenizer, L={report['seq_len']}) into "
                             f"{report['out']}; evaluate with: ddlm eval {report['out']}")
    return 0


def cmd_lm_eval(args, extra: list[str]) -> int:
    from ddlm.interop.lm_eval import cli_main

    if args.mc_samples < 1:
        raise DdlmError(f"--mc-samples {args.mc_samples} must be at least 1")
    return cli_main(args.checkpoint, args.tasks, args.mc_samples, extra, args.json)


def cmd_export(args, extra: list[str]) -> int:
    from ddlm.interop.export import export_hf

    if extra:
        raise DdlmError(f"export takes no option {extra[0]}")
    report = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    _emit(report, args.json, f"exported {args.checkpoint} to {report.get('out', args.out)} "
                             f"({report.get('architecture', 'ddlm')}"
                             f"{', with its modeling code: trust_remote_code=True' if report.get('remote_code') else ''})")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`ddlm: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str):
        raise DdlmError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="ddlm", description="Discrete diffusion language models beside "
                                "an autoregressive baseline: train, evaluate, sample, compare.",
                                epilog=OVERRIDE_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, func, help_text in COMMANDS:
        s = sub.add_parser(name, help=help_text, description=help_text, epilog=OVERRIDE_HELP)
        s.set_defaults(func=func)
        s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        ARGUMENTS[name](s)
    return p


def _train_args(s):
    from ddlm.methods.base import method_names

    s.add_argument("--method", help=" | ".join(method_names()))
    s.add_argument("--data", help="austen | text8:PATH | hf:PATH | PATH.txt | prepared:DIR (default austen)")
    s.add_argument("--tokenizer", help="char | byte | bpe | cl100k | gpt2 | bert[:VOCAB] (default char)")
    s.add_argument("--out", required=True, help="run directory (resumed if it holds this run)")
    s.add_argument("--steps", type=int, help="optimizer steps (same as --train.steps)")
    s.add_argument("--config", help="YAML recipe applied before the command-line options")
    s.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    s.add_argument("--init", help="start from this checkpoint's weights, data and model options (e.g. "
                                  "MDLM for --method bd3, or for --method edlm --edlm.energy nce)")


def _eval_args(s):
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--data", help="evaluate on another corpus (default: the run's)")
    s.add_argument("--split", default=None, help="train | valid | test (default valid)")
    s.add_argument("--results", default=None, help="append the results to FILE.jsonl (with config, "
                                                   "seed and versions)")
    f = s.add_argument_group("infilling (--infill-test)")
    f.add_argument("--infill-test", type=int, default=None, metavar="N",
                   help="hide a random span in each of N held-out sequences and score it: diffusion given both "
                        "sides (a bound), AR given the left side (exact)")
    f.add_argument("--infill-span", type=int, default=16, metavar="S", help="tokens per span (default 16)")
    f.add_argument("--infill-samples", type=int, default=8, metavar="K",
                   help="t-samples per span for diffusion bounds (default 8)")
    z = s.add_argument_group("zero-shot (--zero-shot)")
    z.add_argument("--zero-shot", action="store_true",
                   help="evaluate on --data as the papers do: their detokenizer (PTB, WikiText, LAMBADA, LM1B), "
                        "windows of L with BOS/EOS, the window's BOS given and not counted")
    z.add_argument("--detokenizer", default=None, help="ptb | wikitext | lambada | lm1b | none (default: from "
                                                       "the corpus name)")
    z.add_argument("--protocol", default=None, choices=["mdlm", "sedd", "bd3"],
                   help="whose window layout (default mdlm; docs/zero-shot.md)")
    g = s.add_argument_group("generation (--generate)")
    g.add_argument("--generate", action="store_true", help="evaluate samples instead of the likelihood")
    g.add_argument("--gen-steps", default="8,32,128", help="denoising step counts (default 8,32,128)")
    g.add_argument("--top-p", default="1.0", help="nucleus masses, e.g. 1.0,0.9 (default 1.0)")
    g.add_argument("--num", type=int, default=16, help="samples per setting (default 16)")
    g.add_argument("--length", type=int, default=None, help="tokens per sample (default: context)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--judge", action="append", help="ar:DIR | smollm2 | smollm2:FILE.gguf | hf:DIR "
                                                     "(repeatable)")
    g.add_argument("--conditional", type=int, default=0, metavar="N",
                   help="also continue N held-out test prompts; MAUVE under the first judge")


def _sample_args(s):
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--num", type=int, default=None, help="number of samples (default 4)")
    s.add_argument("--length", type=int, default=None, help="new tokens per sample (default: context)")
    s.add_argument("--prompt", default=None, help="text the samples continue")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (diffusion methods)")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--sampler", default=None, help="sampler name (default: the method's)")
    s.add_argument("--no-cache", action="store_true", help="disable the KV / no-change cache")
    s.add_argument("--out", default=None, help="write samples to FILE.jsonl")
    s.add_argument("--judge", default=None, help="ar:DIR: score the samples under that AR run "
                                                 "(gen PPL, bits per byte)")
    s.add_argument("--infill", default=None, metavar="TEXT",
                   help='fill the spans of TEXT: [MASK] one token, [MASK:n] n tokens, [MASK:?] up to 16 '
                        'ended by EOS, e.g. "It is a truth [MASK:12] acknowledged" (diffusion methods)')
    s.add_argument("--show", action="store_true", help="draw the denoising live in the terminal")
    s.add_argument("--show-html", default=None, metavar="FILE.html",
                   help="write a self-contained page that replays the draw step by step")


def _compare_args(s):
    s.add_argument("recipe", help="comparison recipe (recipes/austen-char.yaml, recipes/owt.yaml, ...); "
                                  "under torchrun every process trains each row and scores the likelihoods, "
                                  "rank 0 alone samples and writes the files")
    s.add_argument("--out", default=None, help="where runs, results and the report go (default "
                                               "runs/compare-<recipe>[-<scale>]; rerun to resume)")
    s.add_argument("--scale", default=None, metavar="NAME",
                   help="apply the recipe's scales.NAME overrides (e.g. tiny: the same rows on CPU in minutes)")


def _info_args(s):
    s.add_argument("checkpoint", help="run directory or checkpoint directory")


def _quickstart_args(s):
    s.add_argument("--out", default="runs/quickstart", help="where the runs are written")
    s.add_argument("--steps", type=int, default=None, help="training steps per method")
    s.add_argument("--methods", default=None, help="comma-separated methods to train (default ar,mdlm)")


def _data_args(s):
    import os

    s.add_argument("action", choices=["prepare"], help="prepare: tokenize SOURCE once into sharded "
                                                        "memory-mapped token files plus DIR/index.json")
    s.add_argument("source", nargs="?", help="austen | text8:PATH | hf:PATH | PATH.txt (large files are streamed)")
    s.add_argument("--tokenizer", help="char | byte | bpe | cl100k | gpt2 | bert:VOCAB (bert-base-uncased "
                                       "vocab.txt or tokenizer.json; or bert with $DDLM_BERT_VOCAB)")
    s.add_argument("--out", help="directory to write (train with --data.corpus prepared:DIR)")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: the CPU count); the files do not depend on it")
    s.add_argument("--packing", default="wrap", help="wrap (documents joined by EOS, cut into rows; default) | "
                                                     "pad (one row per line: BOS + ids + EOS, padded)")
    s.add_argument("--seq-len", type=int, default=None, help="check that every split gives a row of L tokens "
                                                             "(rows are cut when read, at the run's data.seq_len)")
    s.add_argument("--align", type=int, default=0, metavar="B", help="wrap: pad after each document so the next "
                                                                     "starts at a multiple of B (BD3-LM blocks)")
    s.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    s.add_argument("--bpe-vocab-size", type=int, default=2048, help="vocabulary of a bpe tokenizer, trained "
                                                                    "on the train split (default 2048)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing prepared DIR")


def _import_args(s):
    s.add_argument("source", help="a local model folder: a transformers GPT-2 (config.json + safetensors), "
                                   "the public MDLM / BD3-LM / SEDD checkpoints, or a folder `ddlm export` wrote")
    s.add_argument("--out", required=True, help="run directory to write")
    s.add_argument("--method", default=None, help="the ddlm method (default: inferred from the folder)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")


def _export_args(s):
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--to", required=True, choices=["hf"], help="hf: a Hugging Face transformers folder")
    s.add_argument("out", help="folder to write")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")


def _lm_eval_args(s):
    s.add_argument("checkpoint", help="run directory or checkpoint directory")
    s.add_argument("--tasks", required=True, help="lm-eval task names (comma-separated), e.g. lambada_openai")
    s.add_argument("--mc-samples", type=int, default=32, help="Monte-Carlo samples of t per diffusion "
                                                              "log-likelihood (default 32; docs/lm-eval.md)")


COMMANDS = [
    ("train", cmd_train, "train a model (resumes when --out holds the same run)"),
    ("eval", cmd_eval, "likelihood of a checkpoint: BPC, PPL, tokens (a bound for diffusion methods)"),
    ("sample", cmd_sample, "draw samples from a checkpoint"),
    ("info", cmd_info, "describe a checkpoint"),
    ("compare", cmd_compare, "train every method of a recipe on the same budget, evaluate all, "
                             "write report.md, results.json and plots"),
    ("quickstart", cmd_quickstart, "train small AR and MDLM models on Austen, show samples and BPC"),
    ("data", cmd_data, "data prepare SOURCE --tokenizer T --out DIR: tokenize a corpus once, in parallel, "
                       "into sharded memory-mapped token files that training reads in place"),
    ("export", cmd_export, "export a run to a Hugging Face folder (AR natively as GPT-NeoX or GPT-2; diffusion "
                           "methods with their modeling code)"),
    ("lm-eval", cmd_lm_eval, "run lm-eval-harness tasks on a checkpoint (lm-eval's own options pass through, "
                             "e.g. --limit, --num_fewshot, --include_path)"),
    ("import", cmd_import, "import a published model folder (GPT-2, MDLM, BD3-LM, SEDD; safetensors only) "
                           "as a ddlm run directory"),
]
ARGUMENTS = {"train": _train_args, "eval": _eval_args, "sample": _sample_args, "info": _info_args, "compare": _compare_args,
             "quickstart": _quickstart_args, "data": _data_args, "import": _import_args,
             "lm-eval": _lm_eval_args, "export": _export_args}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        return args.func(args, extra)
    except DdlmError as err:
        if os.environ.get("RANK", "0") == "0" or getattr(err, "every_rank", False):  # once per job
            print(f"ddlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
