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
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.build import build_method, check_memory, complete_model_config, prepare_data
from ddlm.checkpoint import (SHARDED_META, SHARDED_STATE, latest_name, load_checkpoint, load_trainer_state,
                             new_temporary, refuse_outside_links, resolve_checkpoint, save_checkpoint,
                             weights_misfit)
from ddlm.config import RunConfig, SampleConfig
from ddlm.data import BlockLoader, tokenizer_from_dict
from ddlm.errors import ConfigError, DataError, DistributedError, write_failure
from ddlm.eval.likelihood import evaluate_likelihood
from ddlm.eval.records import read_jsonl
from ddlm.progress import progress_bar
from ddlm.train import state as resume_state
from ddlm.distributed import Distributed, batch_plan, is_sharded, micro_seed, sharded_batches
from ddlm.train.ema import EMA
from ddlm.train.loggers import Sinks, check_sinks, open_sinks
from ddlm.train.lock import RunLock
from ddlm.train.optim import build_optimizer, lr_at, set_lr

# Options that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {"train.steps", "train.progress", "train.eval_every", "train.eval_batches",
                     "train.ckpt_every", "train.keep_ckpts", "train.log_every", "train.threads",
                     "train.compile", "data.text8_download", "train.micro_batch_size", "train.parallel",
                     "train.dist_timeout", "train.log"}

# The samples drawn at every validation (metrics.jsonl and the dashboards): rows, tokens at most
# (never more than the training length), denoising steps.
SAMPLE_ROWS, SAMPLE_TOKENS, SAMPLE_STEPS = 2, 64, 32


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
    main: bool = True  # rank 0 (or the only process): the one that reports


def train(run: RunConfig, out_dir: str | Path, *, overwrite: bool = False,
          stop_after: int | None = None, quiet: bool = False,
          dist: Distributed | None = None) -> TrainResult:
    """Train (or resume) `run` into `out_dir`. `stop_after=k` stops after step k as if interrupted.
    Under torchrun every process calls this; `dist` defaults to the environment's (a world of one
    unless torchrun started this process)."""
    owned = dist is None
    dist = dist or Distributed.from_environment(runtime.device(), timeout_s=run.train.dist_timeout,
                                                parallel=run.train.parallel)
    try:
        return Trainer(run, out_dir, overwrite=overwrite, quiet=quiet, dist=dist).fit(stop_after=stop_after)
    finally:
        if owned:
            dist.close()


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
                 quiet: bool = False, dist: Distributed | None = None) -> None:
        """Set up (or restore) the run in `out_dir`, which this trainer locks until `fit` ends.
        Every process of a distributed run builds one; rank 0 alone locks, logs and writes."""
        self.dist = dist or Distributed.from_environment(runtime.device(), timeout_s=run.train.dist_timeout,
                                                         parallel=run.train.parallel)
        self.out_dir = Path(out_dir)
        self.quiet = quiet or not self.dist.is_main
        check_sinks(run.train.log)  # a missing dashboard package: refused before anything is written
        self.sinks = Sinks([])  # opened by fit, on rank 0
        self.lock = self.dist.on_main(self._claim_directory, share=False)
        try:
            self._set_up(run, overwrite)
        except BaseException:  # a refused or failed set-up leaves the directory unlocked
            self._release()
            raise
        self.stop_requested = False
        self.stop_agreed = False

    def _claim_directory(self) -> RunLock:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"--out '{self.out_dir}' is a file, not a run directory")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create run directory '{self.out_dir}': {err.strerror}") from None
        lock = RunLock(self.out_dir).acquire()
        probe = self.out_dir / f".write_probe.{os.getpid()}"
        try:  # checkpoints and metrics are written by creating and renaming files here
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
            probe.unlink()
        except OSError as err:
            lock.release()
            raise ConfigError(f"run directory '{self.out_dir}' is not writable ({err.strerror}); ddlm writes its "
                              f"checkpoints and metrics there (choose another --out)") from None
        return lock

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # -- set-up -----------------------------------------------------------------------------
    def _set_up(self, run: RunConfig, overwrite: bool) -> None:
        """Tokenizer, data, method, model, optimiser, EMA and loader; restored when resuming."""
        dist = self.dist
        previous = dist.on_main(lambda: self._previous_checkpoint(run, overwrite))
        cfg = run.train
        self.plan = batch_plan(cfg.batch_size, cfg.micro_batch_size, dist.world_size)
        runtime.set_threads(cfg.threads)
        runtime.seed_everything(cfg.seed)
        self.device = dist.device
        self.dtype = runtime.DTYPES[dist.on_main(
            lambda: runtime.dtype_name(runtime.resolve_dtype(cfg.dtype, self.device)))]
        source = previous or (resolve_checkpoint(cfg.init) if cfg.init else None)
        origin = load_checkpoint(source) if source else None
        if origin is not None and previous is None:
            refuse_another_tokenizer(run, origin.config, cfg.init)
        tokenizer = tokenizer_from_dict(origin.tokenizer_dict) if origin else None
        # rank 0 builds the tokenizer and the token caches; the others then read them
        prepared = {}

        def prepare_on_main() -> dict:
            prepared["main"] = prepare_data(run, tokenizer)
            return prepared["main"][0].to_dict()

        tokenizer_dict = dist.on_main(prepare_on_main)
        self.tokenizer, self.datasets = prepared.get("main") or prepare_data(run, tokenizer_from_dict(tokenizer_dict))
        self.data_digest = {split: self.datasets[split].digest for split in ("train", "valid")}
        self.method = build_method(run, self.tokenizer)
        self.run = complete_model_config(run, self.method, self.tokenizer.vocab_size)
        check_memory(self.run.model, training=True)
        self.model = self.method.build_model(self.run.model).to(self.device)
        if cfg.init and previous is None:
            self._initialise_from(cfg.init)
        elif self.method.needs_init and previous is None:
            raise ConfigError(f"method {run.method!r} starts from a trained run: give --init "
                              f"({self.method.needs_init})")
        if cfg.compile:
            compile_blocks(self.model)
        self.step_module = dist.wrap(self.method, self.model, cfg.parallel, compute_dtype=self.dtype)
        self.sharded = is_sharded(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.loader = BlockLoader(self.datasets["train"], cfg.batch_size, seed=cfg.seed, shuffle=True)
        if len(self.datasets["train"]) < cfg.batch_size:
            raise DataError(f"training split has {len(self.datasets['train'])} sequences, fewer than "
                            f"train.batch_size={cfg.batch_size}; use a larger corpus or smaller batch")
        self.step = 0
        self.resumed_from = 0
        self.nonfinite_steps = 0
        self.keyed_noise = dist.world_size > 1 or cfg.micro_batch_size > 0
        if previous is not None:
            self._restore(previous)

    def _previous_checkpoint(self, run: RunConfig, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None: a fresh run), after refusing a run directory whose
        files lead out of it or would block; --overwrite removes the run's files (a link itself,
        never what it points to)."""
        latest = self.out_dir / "latest"
        if overwrite and (latest.is_file() or latest.is_symlink()):
            for name in ("checkpoints", "latest", "metrics.jsonl", "tensorboard", "wandb"):
                target = self.out_dir / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
            return None
        refuse_outside_links(self.out_dir)
        self._check_metrics_file()
        if not latest.is_file():
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
        """Resume from either layout of the resume state, whatever layout this run writes."""
        state = load_trainer_state(ckpt)
        self._refuse_changed_data(state.get("data"), ckpt)
        if "sharded" in state:
            resume_state.load_sharded(state["sharded"], self.model, self.optimizer, self.ema)
            if self.ema is not None and state.get("ema") is not None:
                self.ema.decay, self.ema.updates = state["ema"]["decay"], state["ema"]["updates"]
        else:
            resume_state.load_whole(state, self.model, self.optimizer, self.ema, self.sharded)
        self.loader.load_state_dict(state["loader"])
        self.method.load_state_dict(state.get("method") or {})
        runtime.set_rng_state(state["rng"])
        self.step = self.resumed_from = state["step"]
        self.dist.on_main(lambda: self._truncate_metrics(self.step))

    def _refuse_changed_data(self, recorded, ckpt: Path) -> None:
        """The corpus must give the token streams the run was trained on (their digests are in the
        resume state): a corpus edited in place would resume on other text from the same position.
        Checkpoints written before digests were recorded resume unchecked."""
        if not isinstance(recorded, dict):
            return
        for split, digest in self.data_digest.items():
            if digest and recorded.get(split) and recorded[split] != digest:
                raise DataError(f"corpus {self.run.data.corpus!r} changed since {ckpt} was written (its {split} "
                                f"split's digest was {recorded[split]}, it is now {digest}); resuming would go on "
                                f"over other text: restore the corpus, or start again (--overwrite, another --out)")

    def _check_metrics_file(self) -> None:
        """metrics.jsonl is appended to and read back: it must be a regular file of the run
        directory (a FIFO or device would block or swallow the log, a link would lead out)."""
        path = self.out_dir / "metrics.jsonl"
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            target = os.path.realpath(path)
            if not Path(target).is_relative_to(self.out_dir.resolve()):
                raise ConfigError(f"'{path}' is a symbolic link to '{os.readlink(path)}', outside the run directory "
                                  f"'{self.out_dir}'; ddlm appends its metrics only inside it (remove the link)")
            mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise ConfigError(f"'{path}' is not a regular file (a FIFO, device or socket); ddlm appends its "
                              f"metrics there: remove it or choose another --out")
        read_jsonl(path)  # every whole line a record, before anything is appended or rewritten

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]  # a torn last line is dropped
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"could not rewrite '{path}' ({write_failure(err)}); it is unchanged") from None

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        try:
            return self._fit(stop_after)
        except RuntimeError as err:
            if self.dist.world_size > 1:  # a collective failed: another process died or hung
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                reason = reason.rsplit("] ", 1)[-1].split(". ")[0][:120]  # gloo/NCCL: the last clause
                raise DistributedError(f"rank {self.dist.rank} lost the other processes ({reason}): one of them "
                                       f"died or timed out; rerun the same command to resume from "
                                       f"{latest_name(self.out_dir) or 'the start'}") from None
            raise

    def _fit(self, stop_after: int | None) -> TrainResult:
        cfg = self.run.train
        handlers = self._install_signal_handlers()
        tokens_per_step = cfg.batch_size * self.run.data.seq_len
        losses: list[float] = []
        valid = None
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=self.quiet or not cfg.progress,
                           desc=f"train {self.run.method}", dynamic_ncols=True)
        start = time.perf_counter()
        start_step = self.step
        checkpoint = resolve_checkpoint(self.out_dir) if self.step >= cfg.steps else None
        bad_in_row = 0
        try:
            if self.step < cfg.steps:
                self.sinks = self.dist.on_main(self._open_sinks, share=False) or Sinks([])
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
                    if self.step == cfg.steps:  # skipped steps left the weights as they were: keep them
                        checkpoint = self.save()
                        raise DataError(f"the last {bad_in_row} step(s), up to step {self.step}, had a loss or "
                                        f"gradient that was not finite and were skipped; the last good weights "
                                        f"are saved in {checkpoint}")
                    if self._stopping(stop_after):
                        checkpoint = self.save()
                        break
                    continue
                bad_in_row = 0
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens_per_s": rate, "tokens": self.step * tokens_per_step})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                last = self.step == cfg.steps
                stopping = self._stopping(stop_after)
                if self.method.adapt_every and self.step % self.method.adapt_every == 0:
                    self.adapt_method()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    valid = self.validate()
                    self.log_samples()
                if last or stopping or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    checkpoint = self.save()
                if stopping and not last:
                    break
        except RuntimeError:
            if self.dist.world_size > 1:
                # A collective failed: torchrun also saw a rank die and is about to SIGTERM this one.
                # Hold that signal (the default action once the handlers are restored below), so
                # this rank lives to say why in one line; it exits right after (fit, the CLI).
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            raise
        finally:
            bar.close()
            self.sinks.close()
            self._restore_signal_handlers(handlers)
            self._release()
        seconds = time.perf_counter() - start
        done = self.step - start_step
        return TrainResult(self.out_dir, self.step, checkpoint, self.step < cfg.steps,
                           runtime.dtype_name(self.dtype), valid, seconds,
                           done * tokens_per_step / max(seconds, 1e-9), self.resumed_from, losses,
                           self.dist.is_main)

    def _stopping(self, stop_after: int | None) -> bool:
        """Whether to checkpoint and stop after this step. A signal is acted on at the same step by
        every rank: the one all of them agreed on."""
        asked = self.stop_agreed or (self.dist.world_size == 1 and self.stop_requested)
        return asked or (stop_after is not None and self.step >= stop_after)

    def _noise(self, micro: int) -> torch.Generator | None:
        """The noise generator of global micro-batch `micro` of this step (None: the global RNG, as
        a one-process run without micro-batches always drew it)."""
        if not self.keyed_noise:
            return None
        return torch.Generator(device=self.device).manual_seed(micro_seed(self.run.train.seed, self.step, micro))

    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step over the global batch: this rank's micro-batches, gradients averaged
        over every micro-batch of every rank. Returns the global mean loss, the gradient norm,
        the learning rate; `stop_agreed` says whether any rank was asked to stop."""
        cfg, plan = self.run.train, self.plan
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        rows = self.loader.next_rows()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a, micro in enumerate(plan.micro_indices(self.dist.rank)):
            batch = self.loader.take(rows[micro * plan.micro:(micro + 1) * plan.micro])
            x0, mask = self._to_device(batch.tokens), self._to_device(batch.mask)
            with self.dist.skip_sync(self.step_module, last=a == plan.accum - 1):
                with runtime.autocast(self.dtype, self.device):
                    loss, _ = self.step_module(x0, mask, self._noise(micro))
                (loss / plan.accum).backward()
            total += loss.detach().double()
        params = [p for p in self.model.parameters() if p.grad is not None]  # trainable only
        # one norm computation: clipping returns the norm before clipping (inf: measure only)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        local_bad = not math.isfinite(float(total))
        agreed = self.dist.all_reduce_sum(torch.tensor([float(total), float(local_bad), float(self.stop_requested)]))
        self.stop_agreed = bool(agreed[2])
        loss_mean = float(agreed[0]) / (plan.accum * plan.world) if not agreed[1] else math.nan
        if not (math.isfinite(loss_mean) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # skip: the weights and optimizer state stay good
            return loss_mean, grad_norm, lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss_mean, grad_norm, lr

    def _to_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """A CPU batch tensor on the training device; to a GPU through pinned memory, without
        waiting for the copy."""
        if tensor is None or self.device.type == "cpu":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    @property
    def eval_rows(self) -> int:
        """Rows of one held-out forward pass: the micro-batch when one is set (a global batch of
        512 x 1024 tokens does not fit one pass), the same on any number of processes."""
        cfg = self.run.train
        return cfg.micro_batch_size or cfg.batch_size

    def eval_batches(self, batches: int) -> int:
        """`batches` global batches of held-out rows, counted in passes of `eval_rows`."""
        return batches * (self.run.train.batch_size // self.eval_rows)

    def validate(self) -> dict:
        cfg = self.run.train
        if not self.method.has_likelihood or self.method.validation == "loss":
            return self._validate_loss()
        with self._inference_weights():
            result = evaluate_likelihood(self.method, self.model, self.datasets["valid"],
                                         batch_size=self.eval_rows, max_batches=self.eval_batches(cfg.eval_batches),
                                         seed=cfg.seed, dtype=self.dtype, dist=self.dist)
        record = {"step": self.step, "split": "valid", "val_nll": result.nll_per_token,
                  "val_bpc": result.bpc, "val_ppl": result.ppl, "val_bpc_stderr": result.bpc_stderr,
                  "val_tokens": result.tokens}
        self._log(record)
        if not self.quiet and not cfg.progress:
            print(f"step {self.step}: valid bpc {result.bpc:.4f}")
        return record

    @torch.no_grad()
    def _validate_loss(self) -> dict:
        """For a method without a likelihood: the mean training loss on validation batches (the
        batches sharded over ranks, each with noise seeded by its index)."""
        cfg = self.run.train
        loader = BlockLoader(self.datasets["valid"], self.eval_rows, shuffle=False, drop_last=False)
        names: list[str] = []
        sums = None
        with self._inference_weights():
            self.model.eval()
            for i, batch, real in sharded_batches(loader, self.eval_batches(cfg.eval_batches), self.dist):
                x0 = batch.tokens.to(self.device)
                mask = batch.mask.to(self.device) if batch.mask is not None else None
                generator = torch.Generator(device=self.device).manual_seed(micro_seed(cfg.seed, -1, i))
                with runtime.autocast(self.dtype, self.device):
                    out = self.method.loss(self.model, x0, loss_mask=mask, generator=generator)
                metrics = out.metrics or {}
                names = sorted(metrics)
                row = torch.tensor([1.0, float(out.loss), *(float(metrics[k]) for k in names)], dtype=torch.float64)
                sums = (0 if sums is None else sums) + row * float(real)
            self.model.train()
        sums = self.dist.all_reduce_sum(sums)
        count = max(float(sums[0]), 1.0)
        record = {"step": self.step, "split": "valid", "val_loss": float(sums[1]) / count,
                  **{f"val_{k}": float(v) / count for k, v in zip(names, sums[2:])}}
        self._log(record)
        return record

    @torch.no_grad()
    def adapt_method(self) -> dict:
        """Let the method tune its own state (BD3-LM: the clipped window) on the first
        `method.adapt_batches` validation batches, with the inference weights and its own
        generator (the training noise stream is not touched); logs what it returns. Every rank
        computes it (a sharded model needs them all); rank 0's result is kept everywhere."""
        loader = BlockLoader(self.datasets["valid"], self.eval_rows, shuffle=False, drop_last=False)
        batches = []
        for batch in loader.epoch_batches():
            if len(batches) >= self.eval_batches(self.method.adapt_batches):
                break
            batches.append(batch.tokens.to(self.device))
        generator = torch.Generator(device=self.device).manual_seed(self.run.train.seed + self.step)
        with self._inference_weights():
            self.model.eval()
            with runtime.autocast(self.dtype, self.device):
                record = self.method.adapt(self.model, batches, generator)
            self.model.train()
        self.method.load_state_dict(self.dist.broadcast(self.method.state_dict()))
        record = self.dist.broadcast(record)
        self._log({"step": self.step, **record})
        return record

    @torch.no_grad()
    def log_samples(self) -> list[str]:
        """Draw SAMPLE_ROWS short samples with the method's default sampler, the inference weights
        and a generator of their own seeded with sample.seed (the same noise at every validation),
        and log them: a {"step", "samples"} line in metrics.jsonl and text in the dashboards. The
        training RNG streams are left as they were. Every rank draws (a sharded model needs them
        all); rank 0 logs."""
        cfg = SampleConfig(num=SAMPLE_ROWS, length=min(SAMPLE_TOKENS, self.run.data.seq_len),
                           steps=SAMPLE_STEPS, seed=self.run.sample.seed, batch_size=SAMPLE_ROWS)
        sampler = self.method.sampler(cfg)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        with self._inference_weights(), torch.random.fork_rng(devices=self._rng_devices()):
            self.model.eval()
            try:
                generation = sampler.generate(self.model, cfg.num, cfg.length, generator=generator)
            finally:
                self.model.train()
        rows = generation.tokens.tolist()
        ends = generation.lengths.tolist() if generation.lengths is not None else [len(rows[0])] * len(rows)
        texts = [self.tokenizer.decode(row[:end]) for row, end in zip(rows, ends)]
        self._log({"step": self.step, "samples": texts})
        if self.dist.is_main:
            for i, text in enumerate(texts):
                self.sinks.text(self.step, f"samples/{i}", text)
        return texts

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _open_sinks(self) -> Sinks:
        """The dashboards train.log names; TensorBoard hides what a killed run logged after the
        step this one resumes from."""
        return open_sinks(self.run.train.log, self.out_dir, self.run.to_dict(),
                          resumed_from=self.resumed_from)

    def _inference_weights(self):
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    def save(self) -> Path:
        """A checkpoint of this step. Whole (rank 0 writes trainer_state.pt), or sharded: every rank
        writes its part of trainer_state/ into the same temporary directory, then rank 0 writes the
        rest and the manifest, renames it into place and only then replaces `latest`."""
        weights = resume_state.inference_weights(self.model, self.ema, sharded=self.sharded,
                                                 is_main=self.dist.is_main)
        meta = {"step": self.step, "loader": self.loader.state_dict(), "rng": runtime.rng_state(),
                "method": self.method.state_dict(), "data": self.data_digest}
        if not self.sharded:
            state = {**meta, **resume_state.whole_state(self.model, self.optimizer, self.ema)}
            return self.dist.on_main(lambda: save_checkpoint(
                self.out_dir, self.step, config=self.run, tokenizer_dict=self.tokenizer.to_dict(), weights=weights,
                trainer_state=state, keep=self.run.train.keep_ckpts))
        tmp = self.dist.on_main(lambda: new_temporary(self.out_dir, self.step))
        resume_state.save_sharded(tmp / SHARDED_STATE, self.model, self.optimizer, self.ema)
        self.dist.barrier()
        if self.ema is not None:
            meta["ema"] = {"decay": self.ema.decay, "updates": self.ema.updates}
        return self.dist.on_main(lambda: save_checkpoint(
            self.out_dir, self.step, config=self.run, tokenizer_dict=self.tokenizer.to_dict(), weights=weights,
            trainer_state=meta, keep=self.run.train.keep_ckpts, tmp=tmp, state_name=SHARDED_META))

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        path = self.out_dir / "metrics.jsonl"
        try:
            with open(path, "a") as f:  # a regular file (_check_metrics_file)
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            kept = latest_name(self.out_dir)
            raise ConfigError(f"could not append to '{path}' ({write_failure(err)}); "
                              + (f"the last checkpoint {kept} is intact" if kept else "no checkpoint was written yet")
                              ) from None
        self.sinks.scalars(record["step"], record)

    # -- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            self.stop_requested = True  # every rank learns of it at the end of this step
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


def refuse_another_tokenizer(run: RunConfig, init: RunConfig, path: str) -> None:
    """A run started with --init uses that run's tokenizer, to whose ids its weights are tied: a
    data.tokenizer (or BPE vocabulary) naming another is refused, so that config.json never says
    one tokenizer while the run used another."""
    mine, theirs = run.data, init.data
    if mine.tokenizer != theirs.tokenizer:
        raise ConfigError(f"train.init={path!r} was trained with the {theirs.tokenizer!r} tokenizer, to whose ids its "
                          f"weights are tied; data.tokenizer={mine.tokenizer!r} contradicts it (leave --tokenizer "
                          f"out to use {theirs.tokenizer!r})")
    if mine.tokenizer == "bpe" and mine.bpe_vocab_size != theirs.bpe_vocab_size:
        raise ConfigError(f"train.init={path!r} has a BPE vocabulary of {theirs.bpe_vocab_size}; "
                          f"data.bpe_vocab_size={mine.bpe_vocab_size} contradicts it (leave it out)")


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block in place (as torchtitan does): each block is one
    graph, whatever the method does between them (BD3's masks, the rows a loss asks for), and DDP
    or FSDP2 wrap the compiled blocks as they would the plain ones."""
    from ddlm.nn.transformer import Block

    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
