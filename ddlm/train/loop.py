"""The method-agnostic training loop: it only ever calls `method.loss(model, x0)`.

AdamW, warm-up + cosine, gradient clipping and accumulation, EMA weights, a measured dtype,
optional torch.compile, JSON-lines metrics, a progress bar, periodic validation, atomic
checkpoints with exact resume, and a checkpoint then a clean exit on SIGINT/SIGTERM.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.build import build_method, check_memory, complete_model_config, prepare_data
from ddlm.checkpoint import (latest_name, load_checkpoint, load_trainer_state, resolve_checkpoint, save_checkpoint,
                             weights_misfit)
from ddlm.config import RunConfig
from ddlm.data import BlockLoader, tokenizer_from_dict
from ddlm.errors import ConfigError, DataError
from ddlm.eval.likelihood import evaluate_likelihood
from ddlm.eval.records import read_jsonl
from ddlm.progress import progress_bar
from ddlm.train.ema import EMA
from ddlm.train.lock import RunLock
from ddlm.train.optim import build_optimizer, lr_at, set_lr

# Options that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {"train.steps", "train.progress", "train.eval_every", "train.eval_batches",
                     "train.ckpt_every", "train.keep_ckpts", "train.log_every", "train.threads",
                     "train.compile", "data.text8_download"}


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    checkpoint: Path
    interrupted: bool
    dtype: str
    valid: dict | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)


def train(run: RunConfig, out_dir: str | Path, *, overwrite: bool = False,
          stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """Train (or resume) `run` into `out_dir`. `stop_after=k` stops after step k as if interrupted."""
    return Trainer(run, out_dir, overwrite=overwrite, quiet=quiet).fit(stop_after=stop_after)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """Settings that make `new` a different run from `old` (derived model fields ignored)."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    derived = {"model.vocab_size", "model.max_len", "model.time_conditioning"}
    skip = RESUMABLE_CHANGES | derived
    keys = sorted((set(a) | set(b)) - skip)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys
            if not k.startswith(("eval.", "sample.")) and a.get(k) != b.get(k)]


class Trainer:
    def __init__(self, run: RunConfig, out_dir: str | Path, *, overwrite: bool = False,
                 quiet: bool = False) -> None:
        """Set up (or restore) the run in `out_dir`, which this trainer locks until `fit` ends."""
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out '{self.out_dir}' is a file, not a run directory")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create run directory '{self.out_dir}': {err.strerror}") from None
        self.lock = RunLock(self.out_dir).acquire()
        try:
            self._set_up(run, overwrite)
        except BaseException:  # a refused or failed set-up leaves the directory unlocked
            self.lock.release()
            raise
        self.stop_requested = False

    # -- set-up -----------------------------------------------------------------------------
    def _set_up(self, run: RunConfig, overwrite: bool) -> None:
        """Tokenizer, data, method, model, optimiser, EMA and loader; restored when resuming."""
        previous = self._previous_checkpoint(run, overwrite)
        cfg = run.train
        runtime.set_threads(cfg.threads)
        runtime.seed_everything(cfg.seed)
        self.device = runtime.device()
        self.dtype = runtime.resolve_dtype(cfg.dtype, self.device)
        source = previous or (resolve_checkpoint(cfg.init) if cfg.init else None)
        tokenizer = tokenizer_from_dict(load_checkpoint(source).tokenizer_dict) if source else None
        self.tokenizer, self.datasets = prepare_data(run, tokenizer)
        self.method = build_method(run, self.tokenizer)
        self.run = complete_model_config(run, self.method, self.tokenizer.vocab_size)
        check_memory(self.run.model, training=True)
        self.model = self.method.build_model(self.run.model).to(self.device)
        if cfg.init and previous is None:
            self._initialise_from(cfg.init)
        elif self.method.needs_init and previous is None:
            raise ConfigError(f"method {run.method!r} starts from a trained run: give --init "
                              f"({self.method.needs_init})")
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.loader = BlockLoader(self.datasets["train"], cfg.batch_size, seed=cfg.seed, shuffle=True)
        if len(self.datasets["train"]) < cfg.batch_size:
            raise DataError(f"training split has {len(self.datasets['train'])} sequences, fewer than "
                            f"train.batch_size={cfg.batch_size}; use a larger corpus or smaller batch")
        self.step = 0
        self.resumed_from = 0
        self.nonfinite_steps = 0
        if previous is not None:
            self._restore(previous)

    def _previous_checkpoint(self, run: RunConfig, overwrite: bool) -> Path | None:
        if not (self.out_dir / "latest").is_file():
            return None
        if overwrite:
            for name in ("checkpoints", "latest", "metrics.jsonl"):
                target = self.out_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            return None
        ckpt = resolve_checkpoint(self.out_dir)
        old = load_checkpoint(ckpt).config
        diffs = run_differences(old, run)
        if diffs:
            raise ConfigError(f"output dir '{self.out_dir}' holds a different run ({diffs[0]}); "
                              f"choose another --out or pass --overwrite")
        return ckpt

    def _initialise_from(self, path: str) -> None:
        """Load another run's inference weights (e.g. MDLM's, to fine-tune as BD3-LM, or as the
        frozen denoiser and starting energy of EDLM)."""
        ckpt = load_checkpoint(path)
        weights = self.method.adopt_weights(self.model, ckpt.weights, ckpt.config.method)
        misfit = weights_misfit(self.model, weights)
        if misfit and ckpt.config.method != self.run.method:
            raise ConfigError(f"train.init={path!r} is a {ckpt.config.method!r} run whose weights do not "
                              f"fit a {self.run.method!r} model ({misfit})")
        if misfit:
            raise ConfigError(f"train.init={path!r}: its weights do not fit this model ({misfit}); "
                              f"use the same model.* options")

    def _restore(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.loader.load_state_dict(state["loader"])
        self.method.load_state_dict(state.get("method") or {})
        runtime.set_rng_state(state["rng"])
        self.step = self.resumed_from = state["step"]
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]  # a torn last line is dropped
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
        os.replace(tmp, path)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        cfg = self.run.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handlers = self._install_signal_handlers()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.run.data.seq_len
        losses: list[float] = []
        valid = None
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=self.quiet or not cfg.progress,
                           desc=f"train {self.run.method}", dynamic_ncols=True)
        start = time.perf_counter()
        start_step = self.step
        checkpoint = resolve_checkpoint(self.out_dir) if self.step >= cfg.steps else None
        bad_in_row = 0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self._train_step()
                self.step += 1
                losses.append(loss)
                rate = tokens_per_step / (time.perf_counter() - t0)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    bad_in_row += 1
                    self.nonfinite_steps += 1
                    self._log({"step": self.step, "skipped": "nonfinite", "loss": str(loss),
                               "grad_norm": str(grad_norm), "nonfinite_steps": self.nonfinite_steps})
                    if bad_in_row >= cfg.max_nonfinite:
                        kept = latest_name(self.out_dir)
                        raise DataError(f"loss or gradients were not finite for {bad_in_row} steps in a row "
                                        f"(up to step {self.step}); stopped, "
                                        + (f"{kept} keeps the last good weights" if kept else "nothing was saved")
                                        + "; lower train.lr or check the data")
                    bar.update(1)
                    continue
                bad_in_row = 0
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": rate, "tokens": self.step * tokens_per_step})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                last = self.step == cfg.steps
                stopping = self.stop_requested or (stop_after is not None and self.step >= stop_after)
                if self.method.adapt_every and self.step % self.method.adapt_every == 0:
                    self.adapt_method()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    valid = self.validate()
                if last or stopping or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    checkpoint = self.save()
                if stopping and not last:
                    break
        finally:
            bar.close()
            self._restore_signal_handlers(handlers)
            self.lock.release()
        seconds = time.perf_counter() - start
        done = self.step - start_step
        return TrainResult(self.out_dir, self.step, checkpoint, self.step < cfg.steps,
                           runtime.dtype_name(self.dtype), valid, seconds,
                           done * tokens_per_step / max(seconds, 1e-9), self.resumed_from, losses)

    def _train_step(self) -> tuple[float, float, float]:
        cfg = self.run.train
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = self.loader.next_batch()
            x0 = batch.tokens.to(self.device, non_blocking=True)
            mask = batch.mask.to(self.device) if batch.mask is not None else None
            with runtime.autocast(self.dtype, self.device):
                out = self.method.loss(self.step_model, x0, loss_mask=mask)
            (out.loss / cfg.grad_accum).backward()
            total += out.loss.item()
        params = [p for p in self.model.parameters() if p.grad is not None]  # trainable only
        if cfg.grad_clip:  # one norm computation: clipping returns the norm before clipping
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # skip: the weights and optimizer state stay good
            return total / cfg.grad_accum, grad_norm, lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return total / cfg.grad_accum, grad_norm, lr

    def validate(self) -> dict:
        cfg = self.run.train
        if not self.method.has_likelihood or self.method.validation == "loss":
            return self._validate_loss()
        with self._inference_weights():
            result = evaluate_likelihood(self.method, self.model, self.datasets["valid"],
                                         batch_size=cfg.batch_size, max_batches=cfg.eval_batches,
                                         seed=cfg.seed, dtype=self.dtype)
        record = {"step": self.step, "split": "valid", "val_nll": result.nll_per_token,
                  "val_bpc": result.bpc, "val_ppl": result.ppl, "val_bpc_stderr": result.bpc_stderr,
                  "val_tokens": result.tokens}
        self._log(record)
        if not self.quiet and not cfg.progress:
            print(f"step {self.step}: valid bpc {result.bpc:.4f}")
        return record

    @torch.no_grad()
    def _validate_loss(self) -> dict:
        """For a method without a likelihood: the mean training loss on validation batches."""
        cfg = self.run.train
        loader = BlockLoader(self.datasets["valid"], cfg.batch_size, shuffle=False, drop_last=False)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        losses, metrics = [], {}
        with self._inference_weights():
            self.model.eval()
            for i, batch in enumerate(loader.epoch_batches()):
                if i >= cfg.eval_batches:
                    break
                x0 = batch.tokens.to(self.device)
                mask = batch.mask.to(self.device) if batch.mask is not None else None
                with runtime.autocast(self.dtype, self.device):
                    out = self.method.loss(self.model, x0, loss_mask=mask, generator=generator)
                losses.append(out.loss.item())
                for key, value in (out.metrics or {}).items():
                    metrics.setdefault(key, []).append(value)
            self.model.train()
        record = {"step": self.step, "split": "valid", "val_loss": sum(losses) / max(len(losses), 1),
                  **{f"val_{k}": sum(v) / len(v) for k, v in metrics.items()}}
        self._log(record)
        return record

    @torch.no_grad()
    def adapt_method(self) -> dict:
        """Let the method tune its own state (BD3-LM: the clipped window) on the first
        `method.adapt_batches` validation batches, with the inference weights and its own
        generator (the training noise stream is not touched); logs what it returns."""
        loader = BlockLoader(self.datasets["valid"], self.run.train.batch_size, shuffle=False, drop_last=False)
        batches = []
        for batch in loader.epoch_batches():
            if len(batches) >= self.method.adapt_batches:
                break
            batches.append(batch.tokens.to(self.device))
        generator = torch.Generator(device=self.device).manual_seed(self.run.train.seed + self.step)
        with self._inference_weights():
            self.model.eval()
            with runtime.autocast(self.dtype, self.device):
                record = self.method.adapt(self.model, batches, generator)
            self.model.train()
        self._log({"step": self.step, **record})
        return record

    def _inference_weights(self):
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def save(self) -> Path:
        weights = self.model.state_dict()  # frozen parts included, trainable ones as their EMA
        if self.ema is not None:
            weights = {**weights, **self.ema.shadow}
        state = {"step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "loader": self.loader.state_dict(), "rng": runtime.rng_state(),
                 "method": self.method.state_dict()}
        return save_checkpoint(self.out_dir, self.step, config=self.run,
                               tokenizer_dict=self.tokenizer.to_dict(), weights=weights,
                               trainer_state=state, keep=self.run.train.keep_ckpts)

    def _log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            self.stop_requested = True
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
            if not self.quiet:
                print(f"\nddlm: {signal.Signals(signum).name} received; checkpointing after this step")

        saved = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                saved[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return saved

    @staticmethod
    def _restore_signal_handlers(saved: dict) -> None:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
