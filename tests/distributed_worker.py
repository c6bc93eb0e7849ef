"""Run by torchrun from tests/test_distributed.py: every process trains the jobs of a JSON spec in
one process group, then writes what the test checks.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC: {"jobs": [{"run": RunConfig dict, "out": DIR, "stop_after": k | null,
                 "nan_on_rank": r | null, "nan_at_step": s}],
       "eval": {"checkpoint": DIR, "out": FILE} | null}
Each job's weights are compared by the test with a one-process run's. "nan_on_rank" makes that
rank's loss NaN at step `nan_at_step` only (the others stay finite). "eval" scores a checkpoint's
validation split sharded over the ranks and in one process on every rank, and rank 0 writes both.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from ddlm import runtime
from ddlm.config import RunConfig
from ddlm.distributed import Distributed
from ddlm.train.loop import Trainer


def poison(trainer: Trainer, rank: int, step: int) -> None:
    """The loss of `rank` becomes NaN at optimizer step `step` (1-based)."""
    if trainer.dist.rank != rank:
        return
    real = trainer.method.loss

    def loss(model, x0, **kw):
        out = real(model, x0, **kw)
        if trainer.step + 1 == step:
            out.loss = out.loss * float("nan")
        return out

    trainer.method.loss = loss


def weights_digest(trainer: Trainer) -> list[float]:
    """Sum of every trainable tensor, gathered whole: equal on every rank when they agree."""
    from ddlm.train import state

    full = state.inference_weights(trainer.model, None, sharded=trainer.sharded, is_main=True)
    return [float(v.double().sum()) for v in full.values()] if full else []


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist = Distributed.from_environment(runtime.device(), parallel=spec.get("parallel", "ddp"))
    report = {"world": dist.world_size, "jobs": []}
    for job in spec.get("jobs", []):
        trainer = Trainer(RunConfig.from_dict(job["run"]), job["out"], quiet=True, dist=dist)
        if job.get("nan_on_rank") is not None:
            poison(trainer, job["nan_on_rank"], job["nan_at_step"])
        result = trainer.fit(stop_after=job.get("stop_after"))
        digests = [None] * dist.world_size
        torch.distributed.all_gather_object(digests, weights_digest(trainer))
        report["jobs"].append({"step": result.step, "digests": digests, "sharded": trainer.sharded})
    if spec.get("eval"):
        from ddlm.build import load_for_inference, prepare_data
        from ddlm.eval.likelihood import evaluate_likelihood

        loaded = load_for_inference(spec["eval"]["checkpoint"], torch.device("cpu"))
        data = prepare_data(loaded.run, loaded.tokenizer)[1]["valid"]
        options = {"batch_size": 3, "n_samples": 2, "seed": 5}
        sharded = evaluate_likelihood(loaded.method, loaded.model, data, dist=dist, **options)
        alone = evaluate_likelihood(loaded.method, loaded.model, data, **options)
        report["eval"] = {"sharded": sharded.as_dict(), "alone": alone.as_dict()}
    if dist.is_main:
        with open(spec["report"], "w") as f:
            json.dump(report, f)
    dist.close()
    # Under load a worker sometimes aborts after all of the above ("terminate called without an
    # active exception"), which torchrun reports as a failure although every file is written: gloo's
    # native threads can hold work whose tensors reach into Python while the interpreter finalises
    # (pytorch/pytorch#179291). Leave without that shutdown, as `python -m ddlm` does under torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
