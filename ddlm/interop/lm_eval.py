"""ddlm as an lm-eval-harness model, registered as `ddlm` (docs/lm-eval.md).

    import ddlm.interop.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="ddlm", model_args="pretrained=DIR,mc_samples=32", tasks=[...])

or `ddlm lm-eval DIR --tasks T --mc-samples K [lm-eval's own options]` (`cli_main`).

What each request type returns, for a run of any method:

  loglikelihood(context, continuation)   AR: the exact log p(continuation | context). Diffusion: minus
      the method's bound on -log p(continuation | context) with the context clean at every noise
      level (`nll_bound(..., given=context)`), averaged over K = mc_samples Monte-Carlo draws of
      (t, x_t) whose times are stratified over [0, 1) (one random offset, K evenly spaced times per
      request). It is a lower bound on the log-likelihood, noisy: its standard error (the spread
      of the K draws over sqrt(K); conservative, as stratified draws are negatively correlated) is
      kept in `records` and written to `mc_log`. is_greedy: AR, every continuation token is the
      argmax of its next-token distribution; masked diffusion (MDLM, EDLM's denoiser, BD3-LM per
      block given the clean earlier blocks) and SEDD absorbing: the argmax of the denoiser with
      every continuation position masked (one step from t = 1); SEDD uniform: no one-token change
      of the continuation raises the model's probability (every log concrete score at t =
      sampling_eps is <= 0).
  loglikelihood_rolling(text)   the `ddlm eval` protocol on the text's tokens: its whole windows of
      L tokens scored by ddlm.eval.likelihood.evaluate_likelihood (eval.batch_size, eval.seed of
      the run, t_samples = mc_samples), so `ddlm eval --eval.t_samples K` on the same text gives the
      same figure; the last r < L tokens are scored as a continuation with the L - r tokens before
      them as clean context (lm-eval's rule: each token once, the last window full).
  generate_until(context, gen_kwargs)   the method's sampler with the context as prompt, `steps`
      steps, max_gen_toks new tokens, cut at the first EOS and the first stop sequence. Greedy
      requests (do_sample false or temperature 0) sample with top-k 1 where the sampler takes it.

Packing: context + continuation are encoded together (trailing whitespace of the context moved to
the continuation), left-truncated to the model's context L, and the window is exactly those
tokens (no padding: a padded window would condition on pads the model never saw, as training
windows are full); BD3-LM's windows are extended to whole blocks with earlier context tokens,
else with PAD on the left, both marked as context.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ddlm import runtime
from ddlm.errors import ConfigError

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the environment
    raise ConfigError("the lm-eval adapter needs lm-eval: pip install lm-eval") from None

log = logging.getLogger("ddlm.lm_eval")


def as_int(value, name: str) -> int:
    """An integer model_arg ('32', 32); 'auto' batch sizes become 16."""
    if value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return 16
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lm-eval model_arg {name}={value!r} must be an integer") from None
    if number < 0:
        raise ConfigError(f"lm-eval model_arg {name}={value!r} must be >= 0")
    return number


@register_model("ddlm")
class DdlmLM(LM):
    """A ddlm run directory as an lm-eval model (see the module docstring)."""

    def __init__(self, pretrained: str, mc_samples: int = 32, batch_size: int | str = 16,
                 device: str | None = None, seed: int = 0, steps: int = 0, max_length: int = 0,
                 mc_log: str | None = None, max_batch_size=None, **_unused) -> None:
        super().__init__()
        from ddlm.build import load_for_inference

        self.mc_samples = as_int(mc_samples, "mc_samples")
        if self.mc_samples < 1:
            raise ConfigError(f"lm-eval model_arg mc_samples={mc_samples!r} must be >= 1")
        self.batch_size = max(1, as_int(batch_size, "batch_size"))
        dev = torch.device(device) if device else runtime.device()
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"lm-eval device={device!r}: CUDA is not available here; use device=cpu")
        self.loaded = load_for_inference(pretrained, dev)
        self.method, self.model, self.tok = self.loaded.method, self.loaded.model, self.loaded.tokenizer
        if not self.method.has_likelihood:
            raise ConfigError(f"method {self.loaded.run.method!r} defines no likelihood bound to score with")
        context = self.loaded.run.model.max_len
        self.max_length = as_int(max_length, "max_length") or context
        if self.max_length > context:
            raise ConfigError(f"max_length={self.max_length} is longer than the model's context of {context} tokens")
        self.steps = as_int(steps, "steps") or self.loaded.run.sample.steps
        self.seed = as_int(seed, "seed")
        self._device = dev
        self.dtype = runtime.resolve_dtype(self.loaded.run.train.dtype, dev)
        self.generator = torch.Generator(device=dev).manual_seed(self.seed)
        self.multiple = getattr(self.method, "block_size", 1)  # BD3-LM scores whole blocks
        self.mc_log = Path(mc_log) if mc_log else None
        self.records: list[dict] = []  # one per loglikelihood request: logprob, stderr, samples

    @property
    def exact(self) -> bool:
        return self.loaded.run.method == "ar"

    # ---- tokens -------------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of the context and the continuation, encoded together; the context's trailing
        whitespace belongs to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        if whole[:len(ctx)] != ctx:  # the tokenizer merged across the boundary
            cont = self.tok.encode(continuation)
            return whole[:len(whole) - len(cont)], cont
        return ctx, whole[len(ctx):]

    def window(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """(tokens, n_given): context + continuation left-truncated to max_length; for blocks of
        L' > 1, grown on the left to whole blocks (earlier context, else PAD), all context."""
        tokens = (ctx + cont)[-self.max_length:]
        if len(cont) > len(tokens):
            log.warning("continuation of %d tokens cut to the model's %d", len(cont), len(tokens))
        short = -len(tokens) % self.multiple
        if short:
            earlier = (ctx + cont)[:-len(tokens)][-short:]
            tokens = [self.tok.pad_id] * (short - len(earlier)) + earlier + tokens
        return tokens, max(0, len(tokens) - len(cont))

    # ---- loglikelihood --------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        windows = [self.window(*self.encode_pair(*req.args)) for req in requests]
        scored = self.score_windows(windows)
        out = []
        for req, (tokens, n_given), (logprob, stderr, greedy) in zip(requests, windows, scored):
            record = {"context": req.args[0][-200:], "continuation": req.args[1], "tokens": len(tokens),
                      "continuation_tokens": len(tokens) - n_given, "logprob": logprob, "stderr": stderr,
                      "samples": 1 if self.exact else self.mc_samples, "is_greedy": greedy,
                      "exact": self.exact}
            self.records.append(record)
            out.append((logprob, greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, (logprob, greedy))
        self.write_records(self.records[len(self.records) - len(out):])
        if not self.exact and out:
            mean_se = sum(r["stderr"] for r in self.records[-len(out):]) / len(out)
            log.info("ddlm: %d loglikelihoods, conditional %s bound, K=%d samples, mean MC s.e. %.4f nats",
                     len(out), self.loaded.run.method, self.mc_samples, mean_se)
        return out

    def write_records(self, records: list[dict]) -> None:
        if self.mc_log is None or not records:
            return
        with open(self.mc_log, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def score_windows(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, float, bool]]:
        """(logprob, stderr, is_greedy) per (tokens, n_given) window; windows of one length are
        scored together."""
        out: list[tuple[float, float, bool] | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for i, (tokens, n_given) in enumerate(windows):
            if len(tokens) == n_given:  # nothing to score
                out[i] = (0.0, 0.0, True)
            else:
                by_length.setdefault(len(tokens), []).append(i)
        copies = 1 if self.exact else self.mc_samples
        per_call = max(1, self.batch_size // copies)
        for indices in by_length.values():
            for start in range(0, len(indices), per_call):
                chunk = indices[start:start + per_call]
                x0 = torch.tensor([windows[i][0] for i in chunk], device=self._device)
                given = torch.arange(x0.shape[1], device=self._device)[None, :] < torch.tensor(
                    [windows[i][1] for i in chunk], device=self._device)[:, None]
                draws = self.bound_draws(x0, given, copies)  # (copies, R)
                greedy = self.greedy(x0, given)
                for j, i in enumerate(chunk):
                    column = draws[:, j]
                    stderr = float(column.std() / math.sqrt(len(column))) if len(column) > 1 else 0.0
                    out[i] = (-float(column.mean()), stderr, bool(greedy[j]))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def bound_draws(self, x0: torch.Tensor, given: torch.Tensor, copies: int) -> torch.Tensor:
        """(copies, R) float64 draws of the conditional bound (nats) for rows x0 (R, n): the rows
        repeated copy-major, so each call's stratified times give every row evenly spaced ones."""
        R = x0.shape[0]
        draws, done = [], 0
        while done < copies:
            c = min(copies - done, max(1, self.batch_size // R))
            with runtime.autocast(self.dtype, self._device):
                bound = self.method.nll_bound(self.model, x0.repeat(c, 1), n_samples=1,
                                              given=given.repeat(c, 1), generator=self.generator)
            draws.append(bound.nll.double().cpu().view(c, R))
            done += c
        return torch.cat(draws)

    @torch.no_grad()
    def greedy(self, x0: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        """(R,) bool is_greedy of each row's continuation (module docstring)."""
        method, model, free = self.method, self.model, ~given
        ones = torch.ones(x0.shape[0], 1, dtype=torch.float64, device=x0.device)
        with runtime.autocast(self.dtype, self._device):
            if hasattr(method, "logits"):  # AR
                guess = method.logits(model, method.shifted_input(x0)).argmax(-1)
            elif hasattr(method, "log_x_theta"):  # masked diffusion: every continuation position masked
                z = torch.where(free, torch.full_like(x0, method.mask_id), x0)
                guess = method.log_x_theta(model, z, ones, x0=x0).argmax(-1)
            elif method.cfg.graph == "absorbing":  # SEDD: the scores at MASK are p_theta / expm1
                z = torch.where(free, torch.full_like(x0, method.mask_id), x0)
                guess = method.log_score(model, z, ones).argmax(-1)
            else:  # SEDD uniform: x0 a local mode of the model at t ~ 0
                log_s = method.log_score(model, x0, ones * method.cfg.sampling_eps).float()
                return ~((log_s.amax(-1) > 0) & free).any(1)
        return ((guess == x0) | given).all(1)

    # ---- loglikelihood_rolling ------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            value = self.rolling(req.args[0])
            out.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
        return out

    def rolling(self, text: str) -> float:
        """log p(text) by the `ddlm eval` protocol (module docstring): minus the bound's total."""
        from ddlm.data import BlockDataset
        from ddlm.eval.likelihood import evaluate_likelihood

        ids = self.tok.encode(text)
        L = self.max_length
        whole = len(ids) // L
        total = 0.0
        if whole:
            blocks = np.asarray(ids[:whole * L], dtype=np.int64).reshape(whole, L)
            cfg = self.loaded.run.eval
            result = evaluate_likelihood(self.method, self.model, BlockDataset(blocks, None, 1.0),
                                         batch_size=cfg.batch_size, n_samples=self.mc_samples,
                                         seed=cfg.seed, dtype=self.dtype)
            total += result.nll_per_token * result.tokens
        rest = len(ids) - whole * L
        if rest:
            ctx, cont = ids[:len(ids) - rest], ids[len(ids) - rest:]
            (logprob, _, _), = self.score_windows([self.window(ctx, cont)])
            total -= logprob
        return -total

    # ---- generate_until -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            text = self.generate(context, dict(kwargs or {}))
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def generate(self, context: str, kwargs: dict) -> str:
        """One continuation of `context`: the sampler, then cut at EOS and the first stop sequence."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        length = max(1, as_int(kwargs.get("max_gen_toks", 256), "max_gen_toks"))
        L = self.max_length
        prompt = self.tok.encode(context) if context else []
        prompt = prompt[len(prompt) - min(len(prompt), L - min(length, L // 2)):]
        sampler = self.sampler(kwargs)
        ids = torch.tensor(prompt, dtype=torch.long) if prompt else None
        gen = sampler.generate(self.model, 1, length, prompt=ids, generator=self.generator)
        new = gen.tokens[0, len(prompt):].tolist()
        eos = self.tok.eos_id
        if eos in new:
            new = new[:new.index(eos)]
        text = self.tok.decode(new)
        cuts = [text.find(stop) for stop in until if stop and stop in text]
        return text[:min(cuts)] if cuts else text

    def sampler(self, kwargs: dict):
        """The run's sampler at `steps` steps; greedy requests with top-k 1 where it is taken."""
        cfg = dataclasses.replace(self.loaded.run.sample, steps=self.steps)
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if kwargs.get("do_sample") is False or temperature == 0.0:
            try:
                return self.method.sampler(dataclasses.replace(cfg, top_k=1, top_p=1.0))
            except ConfigError:  # SEDD takes no top-k: its own temperature then
                return self.method.sampler(cfg)
        return self.method.sampler(dataclasses.replace(cfg, temperature=temperature))

    # ---- what lm-eval reads -----------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def summary(self) -> dict:
        """What the results should carry beside the harness's metrics: the bound's protocol and
        its Monte-Carlo error over the loglikelihood requests."""
        errors = [r["stderr"] for r in self.records]
        return {"method": self.loaded.run.method, "checkpoint": str(self.loaded.path),
                "exact": self.exact, "mc_samples": 1 if self.exact else self.mc_samples,
                "loglikelihood_requests": len(errors),
                "mean_mc_stderr": sum(errors) / len(errors) if errors else 0.0,
                "max_mc_stderr": max(errors) if errors else 0.0,
                "protocol": ("exact log p(continuation | context)" if self.exact else
                             f"-({self.method.bound_name}) on the continuation given the clean context, "
                             f"mean of {self.mc_samples} stratified Monte-Carlo draws: a lower bound on log p")}


def cli_main(checkpoint: str, tasks: str, mc_samples: int, extra: list[str], as_json: bool) -> int:
    """`ddlm lm-eval DIR --tasks T --mc-samples K [lm-eval options]`: lm-eval's own `run` command
    with this model; prints its results table (or, with as_json, the results as one JSON object on
    stdout, the harness's own output on stderr), with the bound's Monte-Carlo summary under
    "ddlm". A `--model_args` in `extra` is added to pretrained=DIR,mc_samples=K."""
    from lm_eval._cli.harness import HarnessCLI

    extra = list(extra)
    model_args = f"pretrained={checkpoint},mc_samples={mc_samples}"
    if "--model_args" in extra:
        at = extra.index("--model_args")
        model_args += "," + extra[at + 1]
        del extra[at:at + 2]
    if "--device" not in extra:  # lm-eval's own default is cuda; ddlm's is DDLM_DEVICE, else what is here
        extra += ["--device", str(runtime.device())]
    argv = ["run", "--model", "ddlm", "--model_args", model_args, "--tasks", tasks, *extra]
    args = HarnessCLI()._parser.parse_args(argv)
    captured: dict = {}
    evaluate = lm_eval.simple_evaluate

    def recording(*a, **kw):
        """lm-eval's simple_evaluate, given this model built here (so its records can be read)."""
        model = None
        if kw.get("model") == "ddlm":
            given = {k: kw.get(k) for k in ("batch_size", "max_batch_size", "device")}
            model_args = kw.get("model_args") or {}
            model = DdlmLM.create_from_arg_string(model_args, given) if isinstance(model_args, str) \
                else DdlmLM.create_from_arg_obj(model_args, given)
            kw["model"] = model
        results = evaluate(*a, **kw)
        if results is not None and model is not None:
            results["ddlm"] = model.summary()
        captured["results"] = results
        return results

    lm_eval.simple_evaluate = recording
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            args.func(args)
    finally:
        lm_eval.simple_evaluate = evaluate
    results = captured.get("results")
    if results is None:
        return 1
    if as_json:
        from lm_eval.utils import handle_non_serializable

        results.pop("samples", None)
        print(json.dumps(results, default=handle_non_serializable))
    elif "ddlm" in results:
        s = results["ddlm"]
        print(f"ddlm: {s['protocol']}; {s['loglikelihood_requests']} loglikelihood requests, "
              f"mean Monte-Carlo s.e. {s['mean_mc_stderr']:.4f} nats (max {s['max_mc_stderr']:.4f})")
    return 0
