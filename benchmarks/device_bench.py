"""GPU check: the bf16 matmul rate, training tokens/s and MFU, and sampler tokens/s on one device.

    python benchmarks/device_bench.py [--out benchmarks/results] [--device cuda] [--budget-s 220]
    python benchmarks/device_bench.py --tiny --device cpu      # seconds: the smoke test run here

Writes `<out>/device_<device-name-slug>.json` (`..._tiny.json` with --tiny) and prints a table.

Matmul rate: bf16 (n x n) @ (n x n), n = 8192 on a GPU (256 with --tiny), timed with CUDA events
after warm-up; MFU is measured against it (and against the fp32 rate for fp32 rows, --tiny on
the CPU), not against a datasheet peak.

Training: AR, MDLM and BD3-LM (block size 16) at
  base   d768 x 12 layers x 12 heads, L = 1024, batch 8 (the MDLM / BD3-LM papers' OWT backbone)
  small  d256 x 4 layers x 4 heads, L = 256, batch 8 (benchmarks/train_speed.py's small config)
built the way the trainer builds them (ddlm.build.build_method -> complete_model_config ->
method.build_model, ddlm.train.optim.build_optimizer), random token batches; one step is the
trainer's: zero_grad, the method's loss under bf16 autocast, backward, gradient clipping, fused
AdamW, the EMA update. Eager, and wrapped in torch.compile as `train.compile` does (the whole
model; MDLM and BD3 score only masked rows, `logits_at`, whose count is data-dependent: one graph
break there, and one dynamic-shape recompile, both in the warm-up). tokens/s counts batch x L
trained tokens per step; FLOPs per trained token are benchmarks/train_speed.py's counts (AR: 6N +
12 n L D; MDLM and BD3: the work their passes do, see that file); `flops_per_token_6n` is the plain
6N + 12 n L D of every method, for comparison.

Sampling (the base backbone, untrained, generating --sample-length tokens from nothing): MDLM
ancestral with T = length steps (the no-change cache on), BD3-LM's block sampler (ancestral, T =
16 steps per block, KV cache), AR (KV cache), at batch 1 and 64, in fp32 (what `ddlm sample`
runs) and under bf16 autocast; tokens/s = batch x length / seconds.

Rows run in priority order (matmul; eager training; samplers; compiled training; on CUDA, BD3
trained through FlexAttention's sparse block mask, `--flex` block size, marked `16f`) and a row is
skipped, and listed as skipped, when the time left (--budget-s) is short: a compiled or flex row
needs --compile-reserve-s seconds. A row that fails records its error and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_speed
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # ddlm, when it is not installed

import train_speed  # noqa: E402  (the FLOP counts, beside this file)

from ddlm import runtime  # noqa: E402
from ddlm.build import build_method, complete_model_config  # noqa: E402
from ddlm.config import SampleConfig, make_config  # noqa: E402
from ddlm.data import build_tokenizer  # noqa: E402
from ddlm.eval.speed import train_flops_per_token  # noqa: E402
from ddlm.train.ema import EMA  # noqa: E402
from ddlm.train.optim import build_optimizer  # noqa: E402

SIZES = {
    "base": {"model": {"dim": 768, "n_layers": 12, "n_heads": 12}, "seq_len": 1024, "batch": 8},
    "small": {"model": {"dim": 256, "n_layers": 4, "n_heads": 4}, "seq_len": 256, "batch": 8},
    "tiny": {"model": {"dim": 32, "n_layers": 2, "n_heads": 2}, "seq_len": 32, "batch": 2},
}
FLOPS_DEFINITION = ("MFU = tokens/s * flops_per_token / the measured matmul FLOP/s of the row's dtype "
                    "(bf16: n x n x n, n = 8192 on a GPU). " + train_speed.MFU_DEFINITION.split(". ", 1)[1]
                    + " flops_per_token_6n: 6 N + 12 n L D for every method (N matmul weights incl. "
                    "the head; ddlm.eval.speed.train_flops_per_token).")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else runtime.cpu_model()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """FLOP/s of (n x n) @ (n x n) after warm-up: CUDA events on a GPU, wall clock on the CPU."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        seconds = time.perf_counter() - t0
    return 2.0 * n ** 3 * iters / seconds


def parse_method(spec: str) -> tuple[str, dict]:
    return train_speed.parse_method(spec)


def vocabulary(size: int):
    """The char tokenizer (size 0), or a stand-in with `size` ids (MASK, BOS/EOS and PAD last)."""
    if not size:
        return build_tokenizer("char")
    return SimpleNamespace(vocab_size=size, mask_id=size - 1, bos_id=size - 2, eos_id=size - 2, pad_id=size - 3)


def build(spec: str, size: str, vocab: int, dev: torch.device):
    """(run, tokenizer, method, model on dev) as the trainer builds them."""
    name, options = parse_method(spec)
    cfg = SIZES[size]
    base = {"method": name, "model": dict(cfg["model"]), "data": {"seq_len": cfg["seq_len"]},
            "train": {"batch_size": cfg["batch"], "compile": False, "progress": False}}
    if options:
        base[name] = options
    run = make_config(base=base)
    tokenizer = vocabulary(vocab)
    method = build_method(run, tokenizer)
    run = complete_model_config(run, method, tokenizer.vocab_size)
    torch.manual_seed(0)
    model = method.build_model(run.model).to(dev)
    return run, tokenizer, method, model


def flops_per_token(name: str, model_cfg, seq_len: int) -> float:
    if name == "bd3":
        return train_speed.bd3_train_flops_per_token(model_cfg, seq_len)
    if name == "mdlm":
        return train_speed.mdlm_train_flops_per_token(model_cfg, seq_len)
    return train_flops_per_token(model_cfg, seq_len)


def random_batches(tokenizer, n: int, batch: int, seq_len: int, dev: torch.device) -> list[torch.Tensor]:
    """n batches of ordinary ids (none of MASK, BOS, PAD), on the device before timing."""
    specials = torch.tensor(sorted({tokenizer.mask_id, tokenizer.bos_id, tokenizer.pad_id}))
    allowed = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in set(specials.tolist())])
    g = torch.Generator().manual_seed(0)
    return [allowed[torch.randint(0, len(allowed), (batch, seq_len), generator=g)].to(dev) for _ in range(n)]


def time_training(spec: str, size: str, *, dtype: str, compile_: bool, backend: str, steps: int,
                  warmup: int, vocab: int, dev: torch.device) -> dict:
    name, options = parse_method(spec)
    run, tokenizer, method, model = build(spec, size, vocab, dev)
    model.train()
    cfg = run.train
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    if compile_:
        torch._dynamo.reset()  # a fresh cache: earlier rows' models must not count towards its limit
    step_model = torch.compile(model, backend=backend) if compile_ else model
    params = [p for p in model.parameters() if p.requires_grad]
    batches = random_batches(tokenizer, 4, SIZES[size]["batch"], SIZES[size]["seq_len"], dev)
    amp = runtime.DTYPES[dtype]

    def step(i: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(amp, dev):
            out = method.loss(step_model, batches[i % len(batches)])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        return out.loss.detach()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(dev)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step(i) for i in range(steps)]
    sync(dev)
    seconds = (time.perf_counter() - t0) / steps
    loss = float(torch.stack(losses).float().mean())
    tokens = SIZES[size]["batch"] * SIZES[size]["seq_len"]
    row = {"method": name, "size": size, **options, "dtype": dtype, "compile": compile_,
           "backend": backend if compile_ else None, "batch": SIZES[size]["batch"],
           "seq_len": SIZES[size]["seq_len"], "vocab_size": run.model.vocab_size, "block": run.model.block,
           "params": sum(p.numel() for p in model.parameters()),
           "step_s": seconds, "warmup_s": warm_s, "warmup_steps": warmup, "timed_steps": steps,
           "tokens_per_s": tokens / seconds, "loss": loss,
           "flops_per_token": flops_per_token(name, run.model, run.data.seq_len),
           "flops_per_token_6n": train_flops_per_token(run.model, run.data.seq_len)}
    if dev.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return row


def time_sampling(spec: str, size: str, *, batch: int, length: int, dtype: str, vocab: int,
                  dev: torch.device) -> dict:
    name, options = parse_method(spec)
    run, tokenizer, method, model = build(spec, size, vocab, dev)
    model.eval()
    steps = options.get("block_size", length) if name == "bd3" else length
    sampler = method.sampler(SampleConfig(steps=steps))
    amp = runtime.DTYPES[dtype]

    def draw(n: int, seed: int, tokens: int):
        g = torch.Generator(device=dev).manual_seed(seed)
        with torch.no_grad(), runtime.autocast(amp, dev):
            return sampler.generate(model, n, tokens, generator=g)

    draw(batch, 0, min(length, 2 * options.get("block_size", 16)))  # warm-up: kernels, caches, allocator
    sync(dev)
    t0 = time.perf_counter()
    out = draw(batch, 1, length)
    sync(dev)
    seconds = time.perf_counter() - t0
    made = int(out.lengths.sum()) if out.lengths is not None else out.tokens.numel()
    return {"method": name, "sampler": type(sampler).__name__, "size": size, **options, "dtype": dtype,
            "batch": batch, "length": length, "steps": steps if name != "ar" else None, "nfe": out.nfe,
            "seconds": seconds, "tokens_per_s": made / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="directory of the JSON")
    p.add_argument("--device", default="", help="cuda | cpu (default: ddlm.runtime.device())")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes and a few steps, compiled with the eager backend: a smoke test in seconds")
    p.add_argument("--methods", default="ar,mdlm,bd3:16", help="ar, mdlm, sedd, bd3:N (block size N)")
    p.add_argument("--sizes", default="base,small", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (compiled rows: at least 4)")
    p.add_argument("--dtype", default="", help="training dtype: bf16 | fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--flex", type=int, default=16,
                   help="on CUDA, last: BD3 with this block size trained through FlexAttention (0: leave out)")
    p.add_argument("--backend", default="", help="torch.compile backend (default: inductor; eager with --tiny)")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the char tokenizer's)")
    p.add_argument("--sample-size", default="base", help="backbone of the sampler rows")
    p.add_argument("--sample-length", type=int, default=256)
    p.add_argument("--sample-batches", default="1,64")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=220.0, help="stop starting rows after this many seconds")
    p.add_argument("--compile-reserve-s", type=float, default=90.0,
                   help="time a compiled row needs (it is skipped with less left)")
    args = p.parse_args(argv)
    dev = torch.device(args.device) if args.device else runtime.device()
    if args.tiny:
        args.sizes, args.sample_size, args.steps, args.warmup = "tiny", "tiny", 2, 1
        args.sample_length, args.sample_batches, args.matmul_n = 32, "1,4", 256
        args.backend = args.backend or "eager"
        args.compile_reserve_s = min(args.compile_reserve_s, 5.0)
    backend = args.backend or "inductor"
    train_dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    sample_dtypes = ["fp32", "bf16"] if dev.type == "cuda" else ["fp32"]
    methods, sizes = args.methods.split(","), args.sizes.split(",")
    begin = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - begin)

    name = device_name(dev)
    result = {"device": name, "device_type": dev.type, "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "tiny": args.tiny,
              "flops_definition": FLOPS_DEFINITION, "train": [], "sample": [], "skipped": [], "errors": []}
    iters = 50 if dev.type == "cuda" else 5
    result["matmul_n"] = args.matmul_n
    result["matmul_bf16_flops"] = matmul_rate(dev, torch.bfloat16, args.matmul_n, iters)
    rates = {"bf16": result["matmul_bf16_flops"]}
    if train_dtype != "bf16":
        rates[train_dtype] = result[f"matmul_{train_dtype}_flops"] = matmul_rate(
            dev, runtime.DTYPES[train_dtype], args.matmul_n, iters)
    print(f"{name}: bf16 matmul {rates['bf16'] / 1e12:.1f} TFLOP/s (n = {args.matmul_n})", flush=True)

    jobs = [("train", m, s, False) for s in sizes for m in methods]
    jobs += [("sample", m, args.sample_size, b, d) for d in sample_dtypes
             for b in map(int, args.sample_batches.split(",")) for m in methods]
    if not args.no_compile:
        jobs += [("train", m, s, True) for s in sizes for m in methods]
    if dev.type == "cuda" and not args.tiny and args.flex:  # BD3's sparse mask: FlexAttention compiles itself
        jobs += [("train", f"bd3:{args.flex}:flex", s, False) for s in sizes]
    for job in jobs:
        label = " ".join(str(x) for x in job)
        need = args.compile_reserve_s if job[0] == "train" and (job[3] or job[1].endswith(":flex")) else 0.0
        if left() <= need:
            result["skipped"].append(label)
            print(f"skipped (time budget): {label}", flush=True)
            continue
        try:
            if job[0] == "train":
                _, spec, size, compile_ = job
                r = time_training(spec, size, dtype=train_dtype, compile_=compile_, backend=backend,
                                  steps=args.steps, warmup=max(args.warmup, 4) if compile_ else args.warmup,
                                  vocab=args.vocab, dev=dev)
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / rates[train_dtype]
                r["mfu_6n"] = r["tokens_per_s"] * r["flops_per_token_6n"] / rates[train_dtype]
                result["train"].append(r)
                print(_train_row(r), flush=True)
            else:
                _, spec, size, batch, dtype = job
                r = time_sampling(spec, size, batch=batch, length=args.sample_length, dtype=dtype,
                                  vocab=args.vocab, dev=dev)
                result["sample"].append(r)
                print(_sample_row(r), flush=True)
        except Exception as err:  # one failing row (OOM, a compile error) must not lose the others
            message = f"{label}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            result["errors"].append({"job": label, "error": message, "traceback": traceback.format_exc()[-4000:]})
            print(f"FAILED {message}", flush=True)
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - begin
    print_table(result)
    out = Path(args.out) / f"device_{slug(name)}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


TRAIN_HEADER = (f"{'method':<6} {'L_blk':>5} {'size':<6} {'dtype':<5} {'compile':<8} {'batch':>5} {'L':>5} "
                f"{'tok/s':>12} {'MFU':>7} {'MFU 6N':>7} {'step ms':>9} {'warm s':>7}")
SAMPLE_HEADER = (f"{'method':<6} {'sampler':<18} {'size':<6} {'dtype':<5} {'batch':>5} {'length':>6} "
                 f"{'nfe':>6} {'seconds':>8} {'tok/s':>10}")


def _train_row(r: dict) -> str:
    blk = str(r.get("block_size", "-")) + ("f" if r.get("attention") == "flex" else "")
    return (f"{r['method']:<6} {blk:>5} {r['size']:<6} {r['dtype']:<5} {'yes' if r['compile'] else 'no':<8} "
            f"{r['batch']:>5} {r['seq_len']:>5} {r['tokens_per_s']:>12,.0f} {100 * r['mfu']:>6.1f}% "
            f"{100 * r['mfu_6n']:>6.1f}% {1e3 * r['step_s']:>9.1f} {r['warmup_s']:>7.1f}")


def _sample_row(r: dict) -> str:
    return (f"{r['method']:<6} {r['sampler']:<18} {r['size']:<6} {r['dtype']:<5} {r['batch']:>5} "
            f"{r['length']:>6} {r['nfe']:>6} {r['seconds']:>8.2f} {r['tokens_per_s']:>10,.0f}")


def print_table(result: dict) -> None:
    print(f"\n{result['device']} (torch {result['torch']}): bf16 matmul "
          f"{result['matmul_bf16_flops'] / 1e12:.2f} TFLOP/s, n = {result['matmul_n']}")
    print("training: tok/s = batch x L trained tokens per step (BD3's pass runs 2L); MFU against the "
          "measured matmul rate (train_speed.py's FLOP counts; 'MFU 6N': 6N + 12 n L D)")
    print(TRAIN_HEADER)
    for r in result["train"]:
        print(_train_row(r))
    print("\nsampling: tok/s = batch x generated tokens / seconds (untrained weights)")
    print(SAMPLE_HEADER)
    for r in result["sample"]:
        print(_sample_row(r))
    for s in result["skipped"]:
        print(f"skipped (time budget): {s}")
    for e in result["errors"]:
        print(f"FAILED {e['error']}")


if __name__ == "__main__":
    sys.exit(main())
