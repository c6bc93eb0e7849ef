"""Dashboards beside metrics.jsonl: sinks that receive the same scalars and the validation samples.

    sinks = open_sinks(run.train.log, out_dir, run.to_dict())   # rank 0 only
    sinks.scalars(step, {"loss": 2.1, "lr": 3e-4})                # numbers only; the rest is dropped
    sinks.text(step, "samples/0", "It is a truth ...")
    sinks.close()

metrics.jsonl stays the record of a run (it is always written, by the trainer); a sink only
mirrors it. `train.log` names the sinks: jsonl (none) | tensorboard | wandb | tensorboard,wandb.
TensorBoard writes event files into OUT/tensorboard/; wandb runs offline into OUT/wandb/ unless
WANDB_MODE says otherwise, and keeps its run id in OUT/wandb/ddlm-run-id so that a resumed run
continues the same wandb run. No sink makes a network call unless WANDB_MODE asks for one.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
import re
from pathlib import Path
from typing import Protocol

from ddlm.errors import ConfigError

# sink name -> (the module it imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_ID_FILE = "ddlm-run-id"


class Sink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


def sink_names(log: str) -> list[str]:
    """The dashboards `train.log` names besides metrics.jsonl ('jsonl' names none)."""
    return [name for name in log.split(",") if name != "jsonl"]


def check_sinks(log: str) -> None:
    """Refuse, in one line and before anything is written, a sink whose package is not installed."""
    for name in sink_names(log):
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.log={log} needs the package '{package}': pip install {package}")


def numeric(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, without its step (strings, lists, NaN dropped)."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value)}


class Sinks:
    """Every sink `train.log` names, called together; closing twice is harmless."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def scalars(self, step: int, record: dict) -> None:
        values = numeric(record)
        if values:
            for sink in self.sinks:
                sink.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        for sink in self.sinks:
            sink.text(step, tag, text)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def open_sinks(log: str, out_dir: str | Path, config: dict, *, resumed_from: int = 0) -> Sinks:
    """The sinks `train.log` names, writing under `out_dir`; `config` is the run's config dict and
    `resumed_from` the step a resumed run goes on from (0: a fresh run)."""
    check_sinks(log)
    opened: list[Sink] = []
    try:
        for name in sink_names(log):
            opened.append(TensorBoardSink(out_dir, resumed_from) if name == "tensorboard"
                          else WandbSink(out_dir, config, resumed=resumed_from > 0))
    except BaseException:
        Sinks(opened).close()
        raise
    return Sinks(opened)


class TensorBoardSink:
    """Event files in OUT/tensorboard/ (view: tensorboard --logdir OUT/tensorboard). Events an
    earlier process logged after the step this one starts from are purged (hidden), as
    metrics.jsonl is truncated: what a killed run logged past its checkpoint, or a run that
    starts again from step 0."""

    def __init__(self, out_dir: str | Path, resumed_from: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                    purge_step=resumed_from + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run in OUT/wandb/, offline unless WANDB_MODE is set (upload later with
    `wandb sync OUT/wandb/offline-run-*`). Its id is kept in OUT/wandb/ddlm-run-id: a resumed
    ddlm run continues the same wandb run, a run started from step 0 begins a new one."""

    def __init__(self, out_dir: str | Path, config: dict, *, resumed: bool = False) -> None:
        import wandb

        out_dir = Path(out_dir)
        run_id = wandb_run_id(out_dir / "wandb", new=not resumed)
        self.wandb = wandb
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE") or "offline", dir=str(out_dir),
                              project=os.environ.get("WANDB_PROJECT") or "ddlm", name=out_dir.resolve().name,
                              config=config, id=run_id, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Table(columns=["step", "text"], data=[[step, text]])}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(directory: Path, *, new: bool = False) -> str:
    """The wandb run id of this run directory: the stored one, or (`new`, or none stored) a new
    one, stored."""
    path = directory / WANDB_ID_FILE
    if not new and path.is_file():
        stored = path.read_text().strip()
        if re.fullmatch(r"[a-z0-9]{8,64}", stored):
            return stored
    directory.mkdir(parents=True, exist_ok=True)
    run_id = os.urandom(8).hex()
    path.write_text(run_id + "\n")
    return run_id
