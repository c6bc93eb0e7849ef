"""Bad input, tried as a hostile user would: every case runs the real `ddlm` command in a fresh
process and is classed as a clean refusal (exit 2, one line `ddlm: error: ...`), a traceback,
silently accepted (exit 0), or hung (killed after --timeout seconds).

    python benchmarks/hostile.py [--timeout 60] [--out benchmarks/results/hostile.json]

A tiny AR run is trained first; the cases damage copies of it, feed it bad flags, prompts and
corpora. A case may carry its own timeout, a SIGTERM sent after some seconds (then exit 130 is the
clean outcome), and a check of what must survive it (another run's files, a device node), whose
finding is appended to its line. Prints one line per case and the tally; writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
        "--train.batch_size=4", "--train.eval_every=0", "--train.progress=false"]


def ddlm(args: list[str], timeout: float, env: dict, sigterm_after: float | None = None) -> tuple[str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ddlm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        if sigterm_after is not None:
            try:
                proc.communicate(timeout=sigterm_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return "hung", ""
    err = err.strip()
    if "Traceback" in err:
        return "traceback", err.splitlines()[-1]
    if proc.returncode == 0:
        return "accepted", ""
    if sigterm_after is not None and proc.returncode == 130:
        return "clean", err.splitlines()[-1] if err else "exit 130"
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


def tree(root: Path) -> dict:
    """Every entry under `root`, links not followed: files by content, links by target."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = (os.readlink(path) if path.is_symlink()
                                            else path.read_bytes() if path.is_file() else "dir")
    return out


def untouched(root: Path):
    """A check that `root` (another run) is exactly as it was when the case was made."""
    before = tree(root)
    return lambda: None if tree(root) == before else f"{root.name} WAS CHANGED"


def train_other(root: Path, name: str, method: str) -> Path:
    """A second tiny run, of `method`, that some cases point into."""
    out = root / name
    env = {**os.environ, "DDLM_CACHE": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "ddlm", "train", "--method", method, "--out", str(out), "--steps", "2",
                    *TINY], check=True, capture_output=True, env=env)
    return out


def linked_cases(run: Path, root: Path) -> list[tuple]:
    """Run directories whose files are links into another run; resuming with keep_ckpts=1 would
    write there and prune the other run's checkpoint. The other run must come out untouched."""
    def checkpoints(copy):
        shutil.rmtree(copy / "checkpoints")
        (copy / "checkpoints").symlink_to(run / "checkpoints")

    def latest(copy):
        (copy / "latest").unlink()
        (copy / "latest").symlink_to(run / "latest")

    def step(copy):
        ckpt = copy / (copy / "latest").read_text().strip()
        shutil.rmtree(ckpt)
        ckpt.symlink_to(run / (run / "latest").read_text().strip())

    def metrics(copy):
        (copy / "metrics.jsonl").unlink()
        (copy / "metrics.jsonl").symlink_to(run / "metrics.jsonl")

    def lock(copy):
        (copy / ".lock").unlink(missing_ok=True)
        (copy / ".lock").symlink_to(run / ".lock")

    out = []
    for label, link in (("checkpoints/", checkpoints), ("latest", latest), ("checkpoints/step_*", step),
                        ("metrics.jsonl", metrics), (".lock", lock)):
        copy = root / f"linked_{link.__name__}"
        shutil.copytree(run, copy, symlinks=True)
        link(copy)
        out.append((f"{label} a symlink into another run (train --train.keep_ckpts=1)",
                    ["train", "--method", "ar", "--out", str(copy), "--steps", "4", "--train.keep_ckpts=1", *TINY],
                    {"check": untouched(run)}))
    return out


def special_file_cases(run: Path, root: Path, short: float) -> list[tuple]:
    """FIFOs where ddlm reads a file (they would block forever), and devices as sample files
    (replacing one by rename would turn /dev/null into a regular file)."""
    fifo_corpus = root / "corpus.fifo"
    os.mkfifo(fifo_corpus)
    fifo_metrics = root / "fifo_metrics"
    shutil.copytree(run, fifo_metrics)
    (fifo_metrics / "metrics.jsonl").unlink()
    os.mkfifo(fifo_metrics / "metrics.jsonl")
    out = [("FIFO as corpus", ["train", "--data", str(fifo_corpus), "--out", str(root / "t_fifo"), *TINY],
            {"timeout": short}),
           ("FIFO as metrics.jsonl (resume)", ["train", "--method", "ar", "--out", str(fifo_metrics), "--steps", "4",
                                               *TINY], {"timeout": short})]
    device = root / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null, never the real one
    except (PermissionError, OSError):
        return out

    def still_a_device():
        return None if stat.S_ISCHR(os.lstat(device).st_mode) else "THE DEVICE WAS REPLACED BY A REGULAR FILE"

    out.append(("sample --out a character device (a copy of /dev/null)",
                ["sample", str(run), "--num", "1", "--length", "4", "--out", str(device)], {"check": still_a_device}))
    return out


def cases(run: Path, root: Path, short: float = 15) -> list[tuple]:
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

    def fp16_weights(copy, ckpt):
        from safetensors.torch import load_file, save_file

        from ddlm.checkpoint import write_manifest

        w = load_file(ckpt / "model.safetensors")
        save_file({k: v.half() for k, v in w.items()}, ckpt / "model.safetensors")
        write_manifest(ckpt)

    def relabel_heads(copy, ckpt):
        from ddlm.checkpoint import write_manifest

        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["model"]["n_heads"] = 4  # every weight keeps its shape
        (ckpt / "config.json").write_text(json.dumps(cfg))
        write_manifest(ckpt)

    damaged = {
        "latest naming another run's checkpoint": latest(
            f"../{run.name}/{(run / 'latest').read_text().strip()}".encode()),
        "checkpoint without manifest.json": lambda copy, ckpt: (ckpt / "manifest.json").unlink(),
        "fp16 weights (manifest rewritten)": fp16_weights,
        "config.json says n_heads=4 for n_heads=2 weights (manifest rewritten)": relabel_heads,
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
    mdlm = train_other(root, "mdlm_run", "mdlm")
    relabelled = damaged_copy(mdlm, root, "relabelled", lambda copy, ckpt: relabel_method(ckpt, "mdlm", "sedd"))
    out.append(("MDLM weights relabelled sedd (manifest rewritten)",
                 ["sample", str(relabelled), "--num", "1", "--length", "4", "--steps", "2"]))
    out += linked_cases(run, root)
    out += special_file_cases(run, root, short)
    r = str(run)
    out += [
        ("a NaN/inf last step (--train.lr=1e20)", ["train", "--out", str(root / "diverged"), "--steps", "3", *TINY,
                                                  "--train.lr=1e20", "--train.max_nonfinite=100",
                                                  "--train.warmup_steps=0"]),
        ("quickstart, SIGTERM during the first run", ["quickstart", "--out", str(root / "qs"), "--steps", "100000",
                                                      "--data.tokenizer=char", "--model.dim=32", "--model.n_layers=1",
                                                      "--model.n_heads=2", "--train.progress=false"],
         {"sigterm_after": 12.0, "timeout": 60}),
        ("--train.lr=inf", ["train", "--out", str(root / "t"), "--train.lr=inf"]),
        ("--train.lr=nan", ["train", "--out", str(root / "t"), "--train.lr=nan"]),
        ("--train.lr=1e400", ["train", "--out", str(root / "t"), "--train.lr=1e400"]),
        ("--train.steps=1e400", ["train", "--out", str(root / "t"), "--train.steps=1e400"]),
        ("--model.rope_base=0", ["train", "--out", str(root / "t"), "--model.rope_base=0"]),
        ("--model.cond_dim=0", ["train", "--out", str(root / "t"), "--model.cond_dim=0"]),
        ("--model.mlp_ratio=inf", ["train", "--out", str(root / "t"), "--model.mlp_ratio=inf"]),
        ("--train.beta2=1", ["train", "--out", str(root / "t"), "--train.beta2=1"]),
        ("--train.beta1=-0.5", ["train", "--out", str(root / "t"), "--train.beta1=-0.5"]),
        ("--train.weight_decay=-1", ["train", "--out", str(root / "t"), "--train.weight_decay=-1"]),
        ("--train.dist_timeout=inf", ["train", "--out", str(root / "t"), "--train.dist_timeout=inf"]),
        ("--mdlm.sigma_max=inf", ["train", "--method", "mdlm", "--out", str(root / "t"), "--mdlm.sigma_max=inf"]),
        ("eval --eval.seed=-1", ["eval", r, "--eval.seed=-1"]),
        ("sample --temperature inf", ["sample", r, "--temperature", "inf"]),
        ("sample --sample.temperature=inf", ["sample", r, "--sample.temperature=inf"]),
        ("sample --temperature 1e400", ["sample", r, "--temperature", "1e400"]),
        ("sample --top-p nan", ["sample", r, "--top-p", "nan"]),
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


def relabel_method(ckpt: Path, old: str, new: str) -> None:
    """config.json names method `new` for weights trained as `old`; the manifest is rewritten."""
    from ddlm.checkpoint import write_manifest

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["method"] = new
    cfg[new] = {"time_conditioning": cfg.pop(old).get("time_conditioning", False)}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    write_manifest(ckpt)


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
    for label, argv, *options in cases(run, root, short=min(15, args.timeout)):
        opts = options[0] if options else {}
        status, message = ddlm(argv, opts.get("timeout", args.timeout), env, opts.get("sigterm_after"))
        problem = opts["check"]() if "check" in opts else None
        if problem:
            message = f"{message} [{problem}]"
        results.append({"case": label, "status": status, "message": message, "survived": problem is None})
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
