"""Bad input, tried as a hostile user would: every case runs the real `ddlm` command in a fresh
process and is classed as a clean refusal (exit 2, one line `ddlm: error: ...`), a traceback,
silently accepted (exit 0), or hung (killed after --timeout seconds).

    python benchmarks/hostile.py [--timeout 60] [--out benchmarks/results/hostile.json]

A tiny AR run is trained first; the cases damage copies of it, feed it bad flags, prompts and
corpora. Prints one line per case and the tally; writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
        "--train.batch_size=4", "--train.eval_every=0", "--train.progress=false"]


def ddlm(args: list[str], timeout: float, env: dict) -> tuple[str, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "ddlm", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "hung", ""
    err = proc.stderr.strip()
    if "Traceback" in err:
        return "traceback", err.splitlines()[-1]
    if proc.returncode == 0:
        return "accepted", ""
    lines = [line for line in err.splitlines() if line.startswith("ddlm: error:")]
    if proc.returncode == 2 and len(err.splitlines()) == 1 and lines:
        return "clean", lines[0]
    return f"exit {proc.returncode}", err[-200:]


def damaged_copy(run: Path, root: Path, name: str, damage) -> Path:
    copy = root / name
    shutil.copytree(run, copy)
    ckpt = copy / (copy / "latest").read_text().strip()
    damage(copy, ckpt)
    return copy


def cases(run: Path, root: Path) -> list[tuple[str, list[str]]]:
    text = root / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(os.urandom(4096))
    (root / "a_file").write_text("x")
    (root / "bad.yaml").write_text("data: [unclosed")
    (root / "list.yaml").write_text("- 1\n- 2\n")

    def write(name, data):
        return lambda copy, ckpt: (ckpt / name).write_bytes(data)

    def latest(data):
        return lambda copy, ckpt: (copy / "latest").write_bytes(data)

    def nan_weights(copy, ckpt):
        import torch
        from safetensors.torch import load_file, save_file

        from ddlm.checkpoint import write_manifest

        w = load_file(ckpt / "model.safetensors")
        k = next(iter(w))
        save_file({**w, k: torch.full_like(w[k], float("nan"))}, ckpt / "model.safetensors")
        write_manifest(ckpt)

    def int_weights(copy, ckpt):
        from safetensors.torch import load_file, save_file

        from ddlm.checkpoint import write_manifest

        w = load_file(ckpt / "model.safetensors")
        save_file({k: v.long() for k, v in w.items()}, ckpt / "model.safetensors")
        write_manifest(ckpt)

    def wrong_types(copy, ckpt):
        from ddlm.checkpoint import write_manifest

        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["model"]["dim"] = "wide"
        (ckpt / "config.json").write_text(json.dumps(cfg))
        write_manifest(ckpt)

    def huge(copy, ckpt):
        from ddlm.checkpoint import write_manifest

        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["model"]["dim"], cfg["model"]["n_heads"] = 1_000_000, 1
        (ckpt / "config.json").write_text(json.dumps(cfg))
        write_manifest(ckpt)

    def pickle_bomb(copy, ckpt):
        import torch

        from ddlm.checkpoint import write_manifest

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {root / 'pwned'}",))

        torch.save({"step": 1, "model": Payload()}, ckpt / "trainer_state.pt")
        write_manifest(ckpt)

    def sharded_pickle_bomb(copy, ckpt):
        """A sharded (FSDP2-layout) resume state whose torch.distributed.checkpoint metadata
        pickle would run a command when torch unpickles it."""
        import pickle

        import torch

        from ddlm.checkpoint import write_manifest

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {root / 'pwned_sharded'}",))

        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        (ckpt / "trainer_state.pt").unlink()
        torch.save({k: state[k] for k in ("step", "loader", "rng", "method")}, ckpt / "trainer_meta.pt")
        (ckpt / "trainer_state").mkdir()
        (ckpt / "trainer_state" / ".metadata").write_bytes(pickle.dumps(Payload()))
        write_manifest(ckpt)

    damaged = {
        "random weights": write("model.safetensors", os.urandom(2048)),
        "empty weights": write("model.safetensors", b""),
        "truncated weights": lambda c, k: (k / "model.safetensors").write_bytes(
            (k / "model.safetensors").read_bytes()[:500]),
        "random config": write("config.json", os.urandom(300)),
        "empty tokenizer": write("tokenizer.json", b""),
        "latest garbage": latest(b"\x00\xff garbage"),
        "latest outside the run": latest(b"../../etc"),
        "latest empty": latest(b""),
        "NaN weights (manifest rewritten)": nan_weights,
        "int64 weights (manifest rewritten)": int_weights,
        "config with wrong types (manifest rewritten)": wrong_types,
        "config of absurd size (manifest rewritten)": huge,
        "malicious trainer_state.pt (manifest rewritten)": pickle_bomb,
        "malicious sharded trainer_state/.metadata (manifest rewritten)": sharded_pickle_bomb,
    }
    out = []
    for i, (label, damage) in enumerate(damaged.items()):
        copy = damaged_copy(run, root, f"damaged{i}", damage)
        command = "train" if "trainer_state" in label else "sample"
        args = ["train", "--method", "ar", "--out", str(copy), "--steps", "4", *TINY] \
            if command == "train" else ["sample", str(copy), "--num", "1", "--length", "4"]
        out.append((label, args))
        if command != "train":  # `ddlm info` never reads the trainer state: nothing to refuse there
            out.append((f"{label}: info", ["info", str(copy)]))
    r = str(run)
    out += [
        ("--out naming a file", ["train", "--out", str(root / "a_file"), "--steps", "1", *TINY]),
        ("sample --out a directory", ["sample", r, "--out", str(root)]),
        ("sample --out in a missing directory", ["sample", r, "--out", str(root / "nope" / "s.jsonl")]),
        ("--model.dim=1000000", ["train", "--out", str(root / "big"), "--steps", "1", "--model.dim=1000000"]),
        ("--model.n_layers=1000000", ["train", "--out", str(root / "deep"), "--steps", "1",
                                      "--model.n_layers=1000000"]),
        ("--train.threads=-4", ["train", "--out", str(root / "t"), "--train.threads=-4"]),
        ("--train.parallel=tp", ["train", "--out", str(root / "t"), "--train.parallel=tp"]),
        ("--train.micro_batch_size=3 of a batch of 4", ["train", "--out", str(root / "t"), *TINY,
                                                        "--train.micro_batch_size=3"]),
        ("--train.grad_accum=2 (the old name)", ["train", "--out", str(root / "t"), "--train.grad_accum=2"]),
        ("--train.dist_timeout=0", ["train", "--out", str(root / "t"), "--train.dist_timeout=0"]),
        ("--train.lr=-1", ["train", "--out", str(root / "t"), "--train.lr=-1"]),
        ("--model.dim=33 (odd heads)", ["train", "--out", str(root / "t"), "--model.dim=33"]),
        ("unknown method", ["train", "--method", "gpt", "--out", str(root / "t")]),
        ("unknown tokenizer", ["train", "--tokenizer", "xyz", "--out", str(root / "t")]),
        ("unknown option", ["train", "--out", str(root / "t"), "--model.width=3"]),
        ("missing corpus", ["train", "--data", str(root / "none.txt"), "--out", str(root / "t")]),
        ("empty corpus", ["train", "--data", str(root / "empty.txt"), "--out", str(root / "t")]),
        ("binary corpus", ["train", "--data", str(root / "binary.bin"), "--out", str(root / "t")]),
        ("bad YAML recipe", ["train", "--config", str(root / "bad.yaml"), "--out", str(root / "t")]),
        ("recipe that is a list", ["train", "--config", str(root / "list.yaml"), "--out", str(root / "t")]),
        ("--steps abc", ["train", "--steps", "abc", "--out", str(root / "t")]),
        ("top-level --steps abc", ["--steps", "abc"]),
        ("sample --steps 1000000000", ["sample", r, "--steps", "1000000000"]),
        ("sample --length 100000000", ["sample", r, "--length", "100000000"]),
        ("sample --num 100000000", ["sample", r, "--num", "100000000"]),
        ("sample --length 0", ["sample", r, "--length", "0"]),
        ("sample --num 0", ["sample", r, "--num", "0"]),
        ("sample --top-k larger than the vocab", ["sample", r, "--top-k", "100000"]),
        ("sample --top-p 0", ["sample", r, "--top-p", "0"]),
        ("sample --temperature -1", ["sample", r, "--temperature", "-1"]),
        ("sample --seed -1", ["sample", r, "--seed", "-1"]),
        ("empty prompt", ["sample", r, "--prompt", ""]),
        ("prompt longer than the context", ["sample", r, "--prompt", "word " * 100]),
        ("prompt in another script", ["sample", r, "--prompt", "καλημέρα"]),
        ("unknown sampler", ["sample", r, "--sampler", "magic"]),
        ("a diffusion sampler for AR", ["sample", r, "--sample.sampler=first_hitting"]),
        ("missing checkpoint", ["sample", str(root / "missing")]),
        ("eval split that does not exist", ["eval", r, "--split", "dev"]),
        ("eval --eval.t_samples=0", ["eval", r, "--eval.t_samples=0"]),
        ("eval --generate --gen-steps x", ["eval", r, "--generate", "--gen-steps", "x"]),
        ("eval --judge gpt9", ["eval", r, "--generate", "--judge", "gpt9"]),
        ("compare with a missing recipe", ["compare", str(root / "none.yaml")]),
        ("compare with a bad recipe", ["compare", str(root / "list.yaml")]),
        ("info on a file", ["info", str(text)]),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--out", default="benchmarks/results/hostile.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ddlm-hostile-"))
    env = {**os.environ, "DDLM_CACHE": str(root / "cache")}
    run = root / "run"
    status, message = ddlm(["train", "--method", "ar", "--out", str(run), "--steps", "2", *TINY],
                           args.timeout, env)
    assert status == "accepted", (status, message)
    results = []
    for label, argv in cases(run, root):
        status, message = ddlm(argv, args.timeout, env)
        results.append({"case": label, "status": status, "message": message})
        print(f"{status:<10} {label}: {message[:150]}")
    tally = {s: sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})}
    print(f"\n{len(results)} bad inputs: " + ", ".join(f"{n} {s}" for s, n in tally.items()))
    executed = (root / "pwned").exists() or (root / "pwned_sharded").exists()
    print(f"malicious pickle executed: {executed}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cases": results, "tally": tally,
                                          "pickle_executed": executed}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
