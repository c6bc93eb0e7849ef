"""Bad input, tried as a hostile user would: every case runs the real `ddlm` command in a fresh
process and is classed as a clean refusal (exit 2, one line `ddlm: error: ...`), a traceback,
silently accepted (exit 0), or hung (killed after --timeout seconds).

    python benchmarks/hostile.py [--timeout 60] [--out benchmarks/results/hostile.json]

A tiny AR run is trained first; the cases damage copies of it, feed it bad flags, prompts,
corpora, recipes, caches and environments. A case may carry its own timeout, a SIGTERM sent after
some seconds (then exit 130 is the clean outcome), environment variables, words its message must
hold (`expect`), and a check of what must survive it (another run's files, a device node, a cache
rebuilt), whose finding is appended to its line. A full disk is a small tmpfs and a read-only run
directory an immutable one (chattr +i) when this runs as root (a user's chmod otherwise); cases
that cannot be set up here are left out. Prints one line per case and the tally; writes the JSON.
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
DEEP = "[" * 200_000 + "]" * 200_000  # JSON nested past any recursion limit
MOUNTS: list[Path] = []  # tmpfs mounts of the full-disk cases, unmounted at the end


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


def tree(root: Path, ignore: tuple[str, ...] = ()) -> dict:
    """Every entry under `root`, links not followed: files by content, links by target."""
    out = {}
    for path in sorted(root.rglob("*")):
        if str(path.relative_to(root)) not in ignore:
            out[str(path.relative_to(root))] = (os.readlink(path) if path.is_symlink()
                                                else path.read_bytes() if path.is_file() else "dir")
    return out


def untouched(root: Path, ignore: tuple[str, ...] = ()):
    """A check that `root` (another run) is exactly as it was when the case was made (but for the
    entries in `ignore`: a run's own .lock holds the pid of its last trainer)."""
    before = tree(root, ignore)
    return lambda: None if tree(root, ignore) == before else f"{root.name} WAS CHANGED"


def train_other(root: Path, name: str, method: str, *extra: str) -> Path:
    """A second tiny run, of `method`, that some cases point into."""
    out = root / name
    env = {**os.environ, "DDLM_CACHE": str(root / "cache")}
    subprocess.run([sys.executable, "-m", "ddlm", "train", "--method", method, "--out", str(out), "--steps", "2",
                    *TINY, *extra], check=True, capture_output=True, env=env)
    return out


def rewrite(ckpt: Path, name: str, text: str) -> None:
    """Replace one file of a checkpoint and rewrite its manifest, so only the content is wrong."""
    from ddlm.checkpoint import write_manifest

    (ckpt / name).write_text(text)
    write_manifest(ckpt)


def manifest_files(change):
    """A damage that replaces the manifest's `files` with change(files)."""
    def damage(copy, ckpt):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps({"files": change(manifest["files"])}))
    return damage


def metrics_cases(run: Path, root: Path) -> list[tuple]:
    """metrics.jsonl lines that are not metrics records, read by `ddlm info` and by a resume (which
    must refuse before it rewrites the file)."""
    out = []
    for label, line in (("a line that is a JSON list", b"[1, 2, 3]\n"),
                        ("a line that is not UTF-8", b'{"step": 3, "note": "\xff\xfe"}\n'),
                        ("a string val_bpc", b'{"step": 2, "split": "valid", "val_bpc": "fast"}\n'),
                        ("a line nested 200k deep", b'{"a": ' + DEEP.encode() + b"}\n")):
        copy = root / f"metrics_{len(out)}"
        shutil.copytree(run, copy)
        with open(copy / "metrics.jsonl", "ab") as f:
            f.write(line)
        out += [(f"metrics.jsonl with {label}: info", ["info", str(copy)]),
                (f"metrics.jsonl with {label}: resume", ["train", "--method", "ar", "--out", str(copy), "--steps", "4",
                                                        *TINY], {"check": untouched(copy, (".lock",))})]
    return out


def cache_cases(run: Path, root: Path) -> list[tuple]:
    """Caches under DDLM_CACHE that are damaged (rebuilt, never trusted) or that are not a folder."""
    import numpy as np

    from ddlm.checkpoint import load_checkpoint

    vocab = load_checkpoint(run).config.model.vocab_size

    def cache_copy(name, damage_tokens=None, probe=None):
        cache = root / name
        shutil.copytree(root / "cache", cache)
        for path in (cache / "tokens").glob("stream-*.npy") if damage_tokens else ():
            damage_tokens(path)
        if probe is not None:
            (cache / "dtype_probe.json").write_bytes(probe)
        return cache

    def poison(path):
        stream = np.load(path)
        stream[::7] = vocab + 100  # ids past the vocabulary: would index past the embedding
        np.save(path, stream)

    def tokens_rebuilt(cache):
        def check():
            for path in (cache / "tokens").glob("stream-*.npy"):
                try:
                    if np.load(path).max() >= vocab:
                        return f"{path.name} STILL HOLDS IDS PAST THE VOCABULARY"
                except ValueError:
                    return f"{path.name} WAS NOT REBUILT"
            return None
        return check

    def probe_whole(cache):
        def check():
            try:
                verdicts = json.loads((cache / "dtype_probe.json").read_text())
                assert all(v["choice"] in ("fp32", "bf16") for v in verdicts.values())
            except Exception:
                return "dtype_probe.json WAS NOT MEASURED AGAIN"
            return None
        return check

    out = []
    for label, damage in (("garbage", lambda p: p.write_bytes(os.urandom(4096))),
                          ("truncated", lambda p: p.write_bytes(p.read_bytes()[:200])),
                          ("ids past the vocabulary (poisoned)", poison)):
        cache = cache_copy(f"cache_tokens_{len(out)}", damage_tokens=damage)
        out.append((f"token cache {label} (train; rebuilt)",
                     ["train", "--method", "ar", "--out", str(root / f"t_cache_{len(out)}"), "--steps", "2", *TINY],
                     {"env": {"DDLM_CACHE": str(cache)}, "check": tokens_rebuilt(cache)}))
    for label, probe in (("nested 200k deep", DEEP.encode()), ("a JSON list", b"[1, 2]"), ("not UTF-8", b"\xff\xfe"),
                         ("torn", b'{"cpu": {"fp32": 1')):
        cache = cache_copy(f"cache_probe_{len(out)}", probe=probe)
        out.append((f"dtype_probe.json {label} (train --train.dtype=auto; measured again)",
                     ["train", "--method", "ar", "--out", str(root / f"t_probe_{len(out)}"), "--steps", "1", *TINY],
                     {"env": {"DDLM_CACHE": str(cache)}, "check": probe_whole(cache)}))
    out.append(("DDLM_CACHE naming a file", ["train", "--method", "ar", "--out", str(root / "t_cache_file"),
                                             "--steps", "1", *TINY], {"env": {"DDLM_CACHE": str(root / "a_file")}}))
    for value in ("bogus", "cuda:99", "cpu:x"):
        out.append((f"DDLM_DEVICE={value}", ["sample", str(run), "--num", "1", "--length", "4"],
                    {"env": {"DDLM_DEVICE": value}}))
    return out


def mount_tmpfs(path: Path, kilobytes: int) -> bool:
    """A tmpfs of `kilobytes` at `path` (root only); False when it cannot be mounted here."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False
    if done:
        MOUNTS.append(path)
    return done


def used_kilobytes(path: Path) -> int:
    return (shutil.disk_usage(path).total - shutil.disk_usage(path).free) // 1024


def disk_cases(run: Path, root: Path) -> list[tuple]:
    """A full disk (a small tmpfs) while checkpointing and while writing eval --results, and a
    read-only run directory: one line, the surviving checkpoint named, the earlier files whole."""
    out = []
    for label, free in (("model.safetensors", 16), ("trainer_state.pt", 120)):
        mount = root / f"full_{len(out)}"
        if not mount_tmpfs(mount, 4096):
            break
        shutil.copytree(run, mount / "run")
        subprocess.run(["mount", "-o", f"remount,size={used_kilobytes(mount) + free}k", str(mount)], check=True)
        out.append((f"a full disk while writing {label} (resume, tmpfs)",
                    ["train", "--method", "ar", "--out", str(mount / "run"), "--steps", "4", *TINY],
                    {"expect": ["no space left on device", "checkpoints/step_0000002 is intact"]}))
    out.append(("eval --results naming a directory", ["eval", str(run), "--results", str(root)]))
    out.append(("eval --generate --results naming a directory", ["eval", str(run), "--generate", "--num", "1",
                                                                 "--results", str(root)]))
    if os.path.exists("/dev/full"):
        out.append(("eval --results /dev/full (a full disk; the result is printed)",
                    ["eval", str(run), "--eval.max_batches=1", "--json", "--results", "/dev/full"],
                    {"expect": ["no space left on device"]}))
    mount = root / "full_results"
    if mount_tmpfs(mount, 8):
        (mount / "results.jsonl").write_text('{"kind": "earlier"}\n')
        try:
            (mount / "filler").write_bytes(b"\0" * 8192)  # the rest of the disk
        except OSError:
            pass
        out.append(("eval --results on a full disk (tmpfs)",
                    ["eval", str(run), "--eval.max_batches=1", "--json", "--results", str(mount / "results.jsonl")],
                    {"expect": ["no space left on device"],
                     "check": lambda: None if (mount / "results.jsonl").read_text() == '{"kind": "earlier"}\n'
                     else "THE EARLIER RESULTS WERE CHANGED"}))
    read_only = root / "read_only"
    shutil.copytree(run, read_only)
    if read_only_dir(read_only):
        before = untouched(read_only, (".lock",))
        out.append(("a read-only run directory (resume)", ["train", "--method", "ar", "--out", str(read_only),
                                                          "--steps", "4", *TINY],
                    {"check": lambda: writable_again(read_only) or before()}))
    return out


def read_only_dir(path: Path) -> bool:
    """Make `path` read-only: chmod for a user; root ignores modes, so there chattr +i."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return True
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)]).returncode == 0


def writable_again(path: Path) -> None:
    if os.geteuid() != 0:
        os.chmod(path, 0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def provenance_cases(run: Path, root: Path) -> list[tuple]:
    """What a run says it used must be what it used: an --init run's tokenizer, and the corpus a
    run resumes on."""
    byte_run = train_other(root, "byte_run", "ar", "--tokenizer", "byte")
    corpus = root / "edited.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    edited = root / "edited_run"
    subprocess.run([sys.executable, "-m", "ddlm", "train", "--method", "ar", "--data", str(corpus), "--out",
                    str(edited), "--steps", "2", *TINY], check=True, capture_output=True,
                   env={**os.environ, "DDLM_CACHE": str(root / "cache")})
    corpus.write_text("a lazy dog sleeps under the quick brown fox\n" * 200)  # same size, other text
    return [("--init a byte run --tokenizer char", ["train", "--method", "ar", "--init", str(byte_run),
                                                    "--tokenizer", "char", "--out", str(root / "init_char"),
                                                    "--steps", "2", *TINY]),
            ("corpus edited in place before the resume", ["train", "--method", "ar", "--data", str(corpus),
                                                          "--out", str(edited), "--steps", "4", *TINY],
             {"check": untouched(edited, (".lock",))})]


TINY_RECIPE = {"name": "hostile", "rows": [{"name": "ar", "method": "ar"}],
               "base": {"data": {"seq_len": 32}, "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
                        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "progress": False}},
               "evaluate": {"likelihood": {"max_batches": 1},
                            "generation": {"steps": [4], "num": 1, "length": 8, "batch_size": 1, "judges": ["ar"]}}}


def alias_bomb() -> str:
    """A "billion laughs": nine levels of nine aliases, 9^9 strings once expanded, in 718 bytes."""
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    text = "name: bomb\nrows: [{name: ar, method: ar}]\ndescription:\n" + "".join(f"  - {x}\n" for x in levels)
    return text + "# " + "lol " * ((715 - len(text)) // 4) + "l" * ((715 - len(text)) % 4) + "\n"


def recipe_cases(root: Path) -> list[tuple]:
    """Recipes of the wrong shape, and YAML that expands without end, given to `ddlm compare`
    (and `ddlm train --config`). A recipe that gets past the parser trains a tiny row only."""
    def recipe(name, text):
        (root / name).write_text(text)
        return str(root / name)

    def tiny_with(change):
        data = json.loads(json.dumps(TINY_RECIPE))
        change(data)
        return json.dumps(data)

    bomb = recipe("bomb.yaml", alias_bomb())
    assert len(alias_bomb().encode()) == 718
    recursive = recipe("recursive.yaml", "name: loop\nbase: &a {data: {corpus: austen}, more: [*a]}\n"
                                         "rows: [{name: ar, method: ar}]\n")
    cases = [("recipe with base: 5", recipe("base5.yaml", tiny_with(lambda d: d.update(base=5)))),
             ("recipe with judges: [123]", recipe("judges.yaml", tiny_with(
                 lambda d: d["evaluate"]["generation"].update(judges=[123])))),
             ('recipe with steps: ["four"]', recipe("steps.yaml", tiny_with(
                 lambda d: d["evaluate"]["generation"].update(steps=["four"])))),
             ("recipe with a recursive YAML alias", recursive),
             ("recipe with a NUL byte in a row name", recipe("nul.yaml", tiny_with(
                 lambda d: d["rows"][0].update(name="a\0b")))),
             ("recipe that is a 718-byte YAML alias bomb", bomb),
             ("recipe nested 200k deep", recipe("deep.yaml", "base: " + DEEP + "\n"))]
    out = [(f"compare: {label}", ["compare", path, "--out", str(root / f"cmp_{i}")], {"timeout": 120})
           for i, (label, path) in enumerate(cases)]
    out += [("train --config: a 718-byte YAML alias bomb", ["train", "--config", bomb, "--out", str(root / "t")]),
            ("train --config: a recursive YAML alias", ["train", "--config", recursive, "--out", str(root / "t")])]
    return out + stage_cases(root)


def stage_cases(root: Path) -> list[tuple]:
    """A comparison's finished stage files nested 200k deep: a damaged stage is redone, as a torn one."""
    path = root / "stages.yaml"
    path.write_text(json.dumps(TINY_RECIPE))
    out = root / "cmp_stages"
    done = subprocess.run([sys.executable, "-m", "ddlm", "compare", str(path), "--out", str(out), "--json"],
                          capture_output=True, env={**os.environ, "DDLM_CACHE": str(root / "cache")})
    stages = sorted((out / "stages").glob("*.json")) if done.returncode == 0 else []
    if not stages:  # the comparison cannot run here: nothing to damage
        return []
    metrics = root / "cmp_metrics"  # a row's metrics.jsonl damaged, its training stage to be redone
    shutil.copytree(out, metrics)
    for stage in (metrics / "stages").glob("train-*.json"):
        stage.unlink()
    with open(metrics / "runs" / "ar" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "valid", "val_bpc": "fast"}\n')
    for stage in stages:
        stage.write_text(DEEP)

    def redone():
        return None if all(s.read_text() != DEEP for s in stages) else "A DAMAGED STAGE WAS KEPT"

    return [("compare: stage files nested 200k deep (redone)", ["compare", str(path), "--out", str(out), "--json"],
             {"timeout": 120, "check": redone}),
            ("compare: a row's metrics.jsonl with a string val_bpc", ["compare", str(path), "--out", str(metrics), "--json"],
             {"timeout": 120})]


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


class ImportPayload:
    """Pickled as the weights of a folder to import: unpickling it would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def interop_cases(run: Path, root: Path) -> list[tuple]:
    """Folders to import, exports, lm-eval, infilling, the viewers, the new samplers and dashboards."""
    import pickle

    r = str(run)
    folders = {name: root / f"import_{name}" for name in ("empty", "pickle", "garbage", "gpt2_no_weights", "hub")}
    for folder in folders.values():
        folder.mkdir()
    (folders["pickle"] / "config.json").write_text(json.dumps({"model_type": "mdlm"}))
    (folders["pickle"] / "pytorch_model.bin").write_bytes(pickle.dumps(ImportPayload(root / "pwned_import")))
    (folders["garbage"] / "config.json").write_text("{not json")
    (folders["gpt2_no_weights"] / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32, "vocab_size": 50257}))
    (folders["hub"] / "snapshots" / "a").mkdir(parents=True)
    (folders["hub"] / "snapshots" / "b").mkdir()
    (folders["hub"] / "refs").mkdir()
    (folders["hub"] / "refs" / "main").write_text("../../../etc")
    mdlm = train_other(root, "interop_mdlm", "mdlm")
    m = str(mdlm)
    (root / "export_taken").mkdir()
    (root / "export_taken" / "mine.txt").write_text("keep me")
    return [
        ("import a missing folder", ["import", str(root / "nowhere"), "--out", str(root / "imp")]),
        ("import an empty folder", ["import", str(folders["empty"]), "--out", str(root / "imp")]),
        ("import a folder of pickled weights (a malicious pickle)", ["import", str(folders["pickle"]),
                                                                      "--out", str(root / "imp")],
         {"expect": ["is a pickle", "never unpickles"]}),
        ("import a folder whose config.json is not JSON", ["import", str(folders["garbage"]), "--out", str(root / "imp")]),
        ("import GPT-2 as --method mdlm", ["import", str(folders["gpt2_no_weights"]), "--method", "mdlm",
                                         "--out", str(root / "imp")]),
        ("import GPT-2 without weights", ["import", str(folders["gpt2_no_weights"]), "--out", str(root / "imp")]),
        ("import a hub cache whose refs/main leaves snapshots/", ["import", str(folders["hub"]), "--out", str(root / "imp")]),
        ("import into an existing run", ["import", str(folders["gpt2_no_weights"]), "--out", r],
         {"check": untouched(run)}),
        ("export into a folder that holds other files", ["export", r, "--to", "hf", str(root / "export_taken")],
         {"check": untouched(root / "export_taken")}),
        ("export --to onnx", ["export", r, "--to", "onnx", str(root / "exp")]),
        ("export a missing run", ["export", str(root / "missing"), "--to", "hf", str(root / "exp")]),
        ("lm-eval --mc-samples 0", ["lm-eval", r, "--tasks", "x", "--mc-samples", "0"]),
        ("sample --infill without a span", ["sample", m, "--infill", "no spans here"]),
        ("sample --infill [MASK:0]", ["sample", m, "--infill", "a [MASK:0] b"]),
        ("sample --infill [MASK:abc]", ["sample", m, "--infill", "a [MASK:abc] b"]),
        ("sample --infill an unclosed [MASK", ["sample", m, "--infill", "a [MASK b"]),
        ("sample --infill longer than the context", ["sample", m, "--infill", "a [MASK:4000] b"]),
        ("sample --infill with --prompt", ["sample", m, "--infill", "a [MASK] b", "--prompt", "the"]),
        ("sample --infill on an AR run", ["sample", r, "--infill", "a [MASK:3] b"]),
        ("sample --show-html into a directory", ["sample", m, "--show-html", str(root)],
         {"expect": ["--show-html", "is a directory"]}),
        ("sample --sampler remdm --sample.eta=-1", ["sample", m, "--sampler", "remdm", "--sample.eta=-1"]),
        ("sample --sampler remdm --sample.remask=sometimes", ["sample", m, "--sampler", "remdm",
                                                             "--sample.remask=sometimes"]),
        ("sample --sampler confidence --sample.threshold=0", ["sample", m, "--sampler", "confidence",
                                                             "--sample.threshold=0"]),
        ("sample --sampler confidence --sample.threshold=nan", ["sample", m, "--sampler", "confidence",
                                                               "--sample.threshold=nan"]),
        ("eval --infill-test 0", ["eval", m, "--infill-test", "0"]),
        ("eval --infill-test with a span as long as the context", ["eval", m, "--infill-test", "2",
                                                                  "--infill-span", "32"]),
        ("eval --zero-shot without --data", ["eval", m, "--zero-shot"]),
        ("eval --zero-shot --data a missing file", ["eval", m, "--zero-shot", "--data", str(root / "none.txt")]),
        ("eval --detokenizer without --zero-shot", ["eval", m, "--detokenizer", "ptb"]),
        ("train --train.log=tb", ["train", "--out", str(root / "t"), "--train.log=tb"]),
        ("train --train.log=wandb,wandb", ["train", "--out", str(root / "t"), "--train.log=wandb,wandb"]),
        ("train --model.positions=absolute", ["train", "--out", str(root / "t"), "--model.positions=absolute"]),
        ("train --model.output_vocab=-3", ["train", "--out", str(root / "t"), "--model.output_vocab=-3"]),
    ]


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
        "manifest.json whose files is a list": manifest_files(list),
        "manifest.json whose files are numbers": manifest_files(lambda files: {k: 5 for k in files}),
        "manifest.json nested 200k deep": lambda copy, ckpt: (ckpt / "manifest.json").write_text(DEEP),
        "config.json nested 200k deep (manifest rewritten)": lambda copy, ckpt: rewrite(ckpt, "config.json", DEEP),
        "tokenizer.json nested 200k deep (manifest rewritten)":
            lambda copy, ckpt: rewrite(ckpt, "tokenizer.json", DEEP),
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
    out += interop_cases(run, root)
    out += metrics_cases(run, root)
    out += cache_cases(run, root)
    out += disk_cases(run, root)
    out += provenance_cases(run, root)
    out += recipe_cases(root)
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
    parser.add_argument("--only", default="", help="run only the cases whose label holds this text (no JSON written)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ddlm-hostile-"))
    env = {**os.environ, "DDLM_CACHE": str(root / "cache")}
    run = root / "run"
    status, message = ddlm(["train", "--method", "ar", "--out", str(run), "--steps", "2", *TINY],
                           args.timeout, env)
    assert status == "accepted", (status, message)
    results = []
    try:  # the tmpfs mounts are undone whatever happens
        for label, argv, *options in cases(run, root, short=min(15, args.timeout)):
            if args.only and args.only not in label:
                continue
            opts = options[0] if options else {}
            status, message = ddlm(argv, opts.get("timeout", args.timeout), {**env, **opts.get("env", {})},
                                   opts.get("sigterm_after"))
            problem = opts["check"]() if "check" in opts else None
            missing = [words for words in opts.get("expect", []) if words not in message]
            problem = "; ".join(filter(None, [problem] + [f"THE MESSAGE LACKS {w!r}" for w in missing])) or None
            if problem:
                message = f"{message} [{problem}]"
            results.append({"case": label, "status": status, "message": message, "survived": problem is None})
            print(f"{status:<10} {label}: {message[:150]}")
    finally:
        for mount in MOUNTS:
            subprocess.run(["umount", str(mount)], capture_output=True)
        if (root / "read_only").exists():
            writable_again(root / "read_only")
    tally = {s: sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})}
    print(f"\n{len(results)} bad inputs: " + ", ".join(f"{n} {s}" for s, n in tally.items()))
    executed = any((root / name).exists() for name in ("pwned", "pwned_sharded", "pwned_import"))
    print(f"malicious pickle executed: {executed}")
    if not args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cases": results, "tally": tally,
                                              "pickle_executed": executed}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
