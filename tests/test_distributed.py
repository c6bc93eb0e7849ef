"""Distributed training on torch.distributed: 2 gloo processes of one thread each, launched by
torchrun, against one process at the same global batch.

  - DDP and FSDP2: after 6 steps the weights of 2 processes equal 1 process's (fp32, < 1e-5), for
    AR, MDLM, BD3 (its 2L pass), SEDD and EDLM's NCE energy (frozen denoiser)
  - resume on another world size: 2 processes then 1, and 1 then 2, equal the uninterrupted run;
    an FSDP2 (sharded) checkpoint resumes in one process, a whole one under FSDP2
  - a NaN on one rank makes every rank skip that step
  - the sharded likelihood evaluation equals the one-process figure
  - kill -9 of one rank ends the job with one line; the rerun finishes with the uninterrupted weights
  - torchrun --nnodes 2 (two launchers meeting by c10d rendezvous on localhost) equals one process
  - a plain run initialises no process group
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddlm.config import make_config
from ddlm.data.corpora import load_corpus
from ddlm.errors import ConfigError
from ddlm.distributed import batch_plan, micro_seed
from ddlm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
METHODS = {"ar": {}, "mdlm": {}, "bd3": {"bd3": {"block_size": 4}}, "sedd": {}}


def env() -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DDLM_DEVICE": "cpu"}
    out.pop("RANK", None)
    out.pop("WORLD_SIZE", None)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text("\n".join(load_corpus("austen").train)[:60_000])
    return path


def run_dict(corpus: Path, method: str, **train) -> dict:
    base = {"method": method, "data": {"corpus": str(corpus), "seq_len": 32, "tokenizer": "char"},
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
            "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 2, "eval_every": 0,
                      "eval_batches": 2, "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1,
                      **train},
            **METHODS.get(method, {})}
    return make_config(base=base).to_dict()


def torchrun(spec: dict, tmp: Path, *, nproc: int = 2, timeout: float = 300) -> dict:
    spec = {**spec, "report": str(tmp / f"report_{time.time_ns()}.json")}
    path = tmp / f"spec_{time.time_ns()}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(WORKER), str(path)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-3000:]
    return json.loads(Path(spec["report"]).read_text())


def one_process(run: dict, out: Path, **kw):
    from ddlm.config import RunConfig

    return train(RunConfig.from_dict(run), out, quiet=True, **kw)


def weights(out: Path) -> dict:
    from ddlm.checkpoint import resolve_checkpoint

    return load_file(resolve_checkpoint(out) / "model.safetensors")


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst < tol, f"max |difference| {worst:.3g}"


# ------------------------------------------------------------------------------ the contract

def test_batch_plan_splits_the_global_batch():
    plan = batch_plan(16, 4, 2)
    assert (plan.micro, plan.accum, list(plan.micro_indices(1))) == (4, 2, [2, 3])
    assert batch_plan(16, 0, 4).accum == 1 and batch_plan(16, 0, 4).micro == 4
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        batch_plan(16, 0, 3)
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide"):
        batch_plan(16, 3, 2)


def test_micro_batch_noise_depends_on_its_position_only():
    assert micro_seed(0, 5, 1) == micro_seed(0, 5, 1)
    assert len({micro_seed(0, 5, 1), micro_seed(0, 5, 2), micro_seed(0, 6, 1), micro_seed(1, 5, 1)}) == 4


def test_plain_training_initialises_no_process_group(corpus, tmp_path):
    one_process(run_dict(corpus, "ar", steps=1, micro_batch_size=0), tmp_path / "run")
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------- 2 processes == 1 process

@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory) -> dict[str, Path]:
    """One-process runs of every method (EDLM from the MDLM one), 6 steps of a global batch of 8."""
    tmp = tmp_path_factory.mktemp("one")
    out = {}
    for method in METHODS:
        out[method] = tmp / method
        one_process(run_dict(corpus, method), out[method])
    out["edlm"] = tmp / "edlm"
    one_process(run_dict(corpus, "edlm", init=str(out["mdlm"])), out["edlm"])
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process(parallel, corpus, references, tmp_path):
    """Every method, DDP and FSDP2 (fully_shard per block; EDLM's frozen denoiser left whole)."""
    jobs = [{"run": run_dict(corpus, m, parallel=parallel), "out": str(tmp_path / m)} for m in METHODS]
    jobs.append({"run": run_dict(corpus, "edlm", parallel=parallel, init=str(references["mdlm"])),
                 "out": str(tmp_path / "edlm")})
    report = torchrun({"jobs": jobs, "parallel": parallel}, tmp_path)
    assert report["world"] == 2
    for job, name in zip(report["jobs"], [*METHODS, "edlm"]):
        assert job["step"] == 6 and job["sharded"] == (parallel == "fsdp2")
        assert_same_weights(tmp_path / name, references[name])
        if parallel == "fsdp2":
            assert (tmp_path / name / "checkpoints" / "step_0000006" / "trainer_state" / ".metadata").is_file()


def test_a_nan_on_one_rank_is_skipped_by_every_rank(corpus, tmp_path):
    report = torchrun({"jobs": [{"run": run_dict(corpus, "mdlm", log_every=1), "out": str(tmp_path / "nan"),
                                 "nan_on_rank": 1, "nan_at_step": 3}]}, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    first, second = report["jobs"][0]["digests"]
    assert first == second  # the ranks still hold the same weights


# ------------------------------------------------------------- resume on another world size

@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_resume_on_another_world_size(parallel, corpus, references, tmp_path):
    """2 processes for 3 steps then 1 to the end, and 1 then 2, equal the uninterrupted run (which
    the test above equates with 2 processes). Under FSDP2 the first checkpoint is sharded and the
    one-process resume reads it; the second case shards a whole checkpoint."""
    run = run_dict(corpus, "mdlm", parallel=parallel)
    torchrun({"jobs": [{"run": run, "out": str(tmp_path / "two_then_one"), "stop_after": 3}],
              "parallel": parallel}, tmp_path)
    sharded = (tmp_path / "two_then_one" / "checkpoints" / "step_0000003" / "trainer_meta.pt").is_file()
    assert sharded == (parallel == "fsdp2")
    assert one_process(run, tmp_path / "two_then_one").resumed_from == 3
    assert_same_weights(tmp_path / "two_then_one", references["mdlm"])

    one_process(run, tmp_path / "one_then_two", stop_after=3)
    report = torchrun({"jobs": [{"run": run, "out": str(tmp_path / "one_then_two")}], "parallel": parallel},
                      tmp_path)
    assert report["jobs"][0]["step"] == 6
    assert_same_weights(tmp_path / "one_then_two", references["mdlm"])


# ----------------------------------------------------------------------- sharded evaluation

def test_sharded_likelihood_equals_one_process(references, tmp_path):
    report = torchrun({"eval": {"checkpoint": str(references["mdlm"])}}, tmp_path)
    sharded, alone = report["eval"]["sharded"], report["eval"]["alone"]
    assert sharded["sequences"] == alone["sequences"] and sharded["tokens"] == alone["tokens"]
    assert abs(sharded["nll_per_token"] - alone["nll_per_token"]) < 1e-9
    assert abs(sharded["bpc_stderr"] - alone["bpc_stderr"]) < 1e-9


# ------------------------------------------------------------------ faults and many machines

def cli_args(corpus: Path, out: Path, steps: int, **train) -> list[str]:
    options = {"train.steps": steps, "data.seq_len": 32, "model.dim": 16, "model.n_layers": 1,
               "model.n_heads": 2, "train.batch_size": 8, "train.micro_batch_size": 4, "train.dtype": "fp32",
               "train.eval_every": 0, "train.eval_batches": 1, "train.progress": "false",
               "train.warmup_steps": 2, "train.threads": 1, "train.ckpt_every": 0,
               **{f"train.{k}": v for k, v in train.items()}}
    return ["-m", "ddlm", "train", "--method", "mdlm", "--data", str(corpus), "--tokenizer", "char",
            "--out", str(out), *[f"--{k}={v}" for k, v in options.items()]]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of `rank` that `launcher` (torchrun) started: its child whose
    environment says RANK=rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_kill_9_of_one_rank_ends_the_job_and_the_rerun_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    args = cli_args(corpus, out, 600, ckpt_every=25)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *args]
    launcher = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").is_file() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    victim = rank_pid(launcher, 1)
    assert victim is not None and launcher.poll() is None, "the job ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.time() - killed < 60
    lines = [line for line in stderr.splitlines() if line.startswith("ddlm: error:")]
    assert len(lines) == 1 and "rank 0" in lines[0] and "resume" in lines[0], stderr[-2000:]
    kept = (out / "latest").read_text().strip()
    assert kept.startswith("checkpoints/step_") and int(kept[-7:]) < 600

    rerun = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole = subprocess.run([sys.executable, *cli_args(corpus, tmp_path / "whole", 600)], env=env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_weights(out, tmp_path / "whole")


LOST_PEER = """
import signal, sys, torch
from ddlm import distributed
from ddlm.train.loop import Trainer

def lost(self, values):  # the first step's collective: the other rank has died
    raise RuntimeError("[gloo/transport/tcp/pair.cc:538] Connection closed by peer [127.0.0.1]:1234")

restore = Trainer._restore_signal_handlers

def restore_then_sigterm(saved):  # torchrun's SIGTERM lands just after the handlers are restored
    restore(saved)
    signal.raise_signal(signal.SIGTERM)

distributed.Distributed.from_environment = classmethod(lambda cls, device, **kw: cls(0, 2, 0, device))
distributed.Distributed.all_reduce_sum = lost
distributed.Distributed.wrap = lambda self, method, model, parallel, **kw: distributed.LossModule(method, model)
Trainer._restore_signal_handlers = staticmethod(restore_then_sigterm)
from ddlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_lost_its_peers_says_so_before_the_launchers_sigterm_ends_it(corpus, tmp_path):
    """When one rank dies, the rank whose collective failed and torchrun (which SIGTERMs the others
    as soon as it sees one die) race: the SIGTERM must not end the rank before its one line."""
    args = cli_args(corpus, tmp_path / "run", 10)[2:]  # without "-m ddlm"
    proc = subprocess.run([sys.executable, "-c", LOST_PEER, *args], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.strip().startswith("ddlm: error: rank 0 lost the other processes (Connection closed by peer")


def test_two_nodes_by_rendezvous_equal_one_process(corpus, tmp_path):
    """Two torchrun launchers of one process each ("machines") meeting at a c10d rendezvous on
    localhost train as one job of two ranks."""
    port = free_port()
    args = cli_args(corpus, tmp_path / "nodes", 6)
    # both "machines" are this host, so say which one hosts the rendezvous store
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                   "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                   f"127.0.0.1:{port}", "--rdzv-id", f"ddlm-test-{port}",
                                   "--rdzv-conf", f"is_host={int(node == 0)}", *args],
                                  env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in range(2)]
    for launcher in launchers:
        _, stderr = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, stderr[-2000:]
    whole = subprocess.run([sys.executable, *cli_args(corpus, tmp_path / "whole", 6)], env=env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_weights(tmp_path / "nodes", tmp_path / "whole")


def test_torchrun_eval_equals_one_process(references):
    """`torchrun -m ddlm eval` scores the split sharded over the ranks; rank 0 alone prints it."""
    one = subprocess.run([sys.executable, "-m", "ddlm", "eval", str(references["bd3"]), "--json"], env=env(),
                         capture_output=True, text=True, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "ddlm", "eval", str(references["bd3"]), "--json"], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    printed = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1
    alone = json.loads(one.stdout)
    assert printed[0]["sequences"] == alone["sequences"]
    assert abs(printed[0]["nll_per_token"] - alone["nll_per_token"]) < 1e-9


def test_sigterm_to_the_launcher_checkpoints_every_rank_at_one_step(corpus, tmp_path):
    """torchrun passes SIGTERM to the workers; they agree on the step to stop after, save it and
    exit 130 (rank 0 reports the step). torchrun's own exit status is its own (1)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), *cli_args(corpus, out, 100_000, ckpt_every=50)]
    launcher = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").is_file() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    assert launcher.poll() is None
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=120)
    reported = [line for line in stdout.splitlines() if line.startswith("interrupted at step")]
    assert len(reported) == 1, stdout + stderr[-2000:]
    step = int(reported[0].split()[3].rstrip(":"))
    assert (out / "latest").read_text().strip() == f"checkpoints/step_{step:07d}"
    assert "SIGKILL" not in stderr and "(SIGTERM)" not in stderr  # each worker exited by itself


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_sharded_metadata_is_refused_and_not_executed(tmp_path):
    """torch.distributed.checkpoint unpickles `.metadata` with plain pickle; ddlm reads it first
    with an allow-list, so a pickle naming anything else is refused and nothing in it runs, while
    the metadata torch itself writes passes."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from ddlm.errors import CheckpointError
    from ddlm.train.state import check_sharded_metadata

    folder = tmp_path / "trainer_state"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    with pytest.raises(CheckpointError, match="refused"):
        check_sharded_metadata(folder)
    assert not (tmp_path / "pwned").exists()
    genuine = tmp_path / "genuine"
    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(3), "step": 4}, checkpoint_id=str(genuine))
    check_sharded_metadata(genuine)
