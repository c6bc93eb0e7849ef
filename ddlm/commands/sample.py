"""`ddlm sample`: draw from a checkpoint with its method's sampler, and write the samples file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from ddlm.build import load_for_inference
from ddlm.config import section_config, split_sections
from ddlm.errors import ConfigError, DataError, DdlmError
from ddlm.eval.generation import cut_at_eos, judge_nll, sample_statistics
from ddlm.eval.judges import load_judge
from ddlm.sampling.base import model_device
from ddlm.sampling.infill import close_open_spans, template_tensor


def encode_prompt(tokenizer, prompt: str, context: int) -> torch.Tensor:
    tokenizer.check_prompt(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise DataError(f"prompt {prompt!r} encodes to no tokens")
    if len(ids) >= context:
        raise DataError(f"prompt is {len(ids)} tokens, longer than the model's context of "
                        f"{context} tokens (leave room to generate)")
    return torch.tensor(ids, dtype=torch.long)


def sample_checkpoint(path, *, prompt: str | None = None, options: dict | None = None,
                      extra: list[str] | None = None, judge: str | None = None, infill: str | None = None,
                      recorder=None, on_load=None) -> dict:
    """Draw samples; with `judge` ('ar:DIR', 'smollm2', ...), also score them (cut at EOS) under that AR run and describe them
    (ddlm/eval/generation.py). `infill`: text with [MASK] spans to fill (sampling/infill.py);
    `recorder` (sampling/trace.py) watches every step; on_load(loaded, cfg) is called before drawing."""
    sample_args, method_options = split_sections(extra or [], "sample")
    loaded = load_for_inference(path, method_options=method_options)
    cfg = section_config(loaded.run.sample, "sample", options or {}, sample_args)
    context = loaded.run.model.max_len
    if cfg.stride > context:
        raise ConfigError(f"sample.stride={cfg.stride} is longer than the model's context of {context} tokens")
    if cfg.top_k > loaded.tokenizer.vocab_size:
        raise ConfigError(f"top-k {cfg.top_k} is larger than the vocabulary ({loaded.tokenizer.vocab_size} ids)")
    if prompt is not None and not prompt.strip():
        raise DataError("--prompt is empty; leave it out to sample from nothing")
    if prompt is not None and infill is not None:
        raise ConfigError("give --prompt or --infill, not both")
    prompt_ids = encode_prompt(loaded.tokenizer, prompt, context) if prompt else None
    template = infill_template(loaded, infill) if infill is not None else None
    length = cfg.length or context - (0 if prompt_ids is None else len(prompt_ids))
    sampler = loaded.method.sampler(cfg)
    if template is not None and not getattr(sampler, "takes_template", True):
        raise ConfigError(f"method {loaded.run.method!r} writes left to right and cannot fill spans; "
                          "--infill needs a diffusion method (mdlm, sedd, bd3, edlm)")
    sampler.recorder = recorder
    if on_load is not None:
        on_load(loaded, cfg)
    if (cfg.stop_eos or cfg.stop_entropy) and not getattr(sampler, "variable_length", False):
        raise ConfigError(f"sample.stop_eos / sample.stop_entropy (variable length) are not supported "
                          f"by method {loaded.run.method!r}; use bd3")
    device = model_device(loaded.model)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, nfe, seconds = [], 0, 0.0
    for start in range(0, cfg.num, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num - start)
        if template is not None:
            gen = sampler.generate(loaded.model, n, 0, template=template_tensor(template, context),
                                   generator=generator)
        else:
            gen = sampler.generate(loaded.model, n, length, prompt=prompt_ids, generator=generator)
        ends = gen.lengths.tolist() if gen.lengths is not None else [gen.tokens.shape[1]] * n
        rows = [row[:end] for row, end in zip(gen.tokens.tolist(), ends)]
        if template is not None:
            rows = [close_open_spans(row, template, loaded.tokenizer.eos_id, loaded.tokenizer.pad_id) for row in rows]
        tokens.extend(rows)
        nfe += gen.nfe
        seconds += gen.seconds
    texts = [loaded.tokenizer.decode(t) for t in tokens]
    result = {"method": loaded.run.method, "sampler": type(sampler).__name__, "texts": texts,
              "tokens": tokens, "nfe": nfe, "seconds": seconds, "length": length, "steps": cfg.steps,
              "lengths": length_stats([len(t) for t in tokens]), "checkpoint": str(loaded.path),
              "statistics": sample_statistics(tokens).as_dict()}
    if template is not None:
        result["infill"] = {"text": infill, "spans": [vars(span) for span in template.spans]}
        if loaded.run.method == "bd3":
            result["note"] = ("bd3 fills spans block by block, left to right: each span sees the text before its "
                              "block and the given tokens of its own block, not the text after it")
    if judge:
        start = 0 if prompt_ids is None else len(prompt_ids)
        body, ended = cut_at_eos(tokens, loaded.tokenizer.eos_id, start)
        texts_scored = [loaded.tokenizer.decode(t) for t in body]
        result["judge"] = {"name": judge, **judge_nll(load_judge(judge), texts_scored, ended=ended).as_dict()}
    return result


def infill_template(loaded, text: str):
    from ddlm.sampling.infill import parse_infill

    if not text.strip():
        raise DataError("--infill is empty; give text with [MASK] spans")
    return parse_infill(text, loaded.tokenizer)


def length_stats(lengths: list[int]) -> dict:
    """min / mean / median / max of the sample lengths in tokens."""
    ordered = sorted(lengths)
    return {"min": ordered[0], "mean": sum(ordered) / len(ordered), "median": ordered[len(ordered) // 2],
            "max": ordered[-1]}


def write_output(path: str | Path, text: str) -> None:
    """Write `text` to the samples file `path`. A regular file (or a new one) is replaced
    atomically: a temporary file beside it, fsynced, then renamed over it, so a kill or a full disk
    leaves the old file whole. An existing character device or FIFO (/dev/null, /dev/stdout, a
    pipe) is written into directly, as renaming over it would replace the device with a regular
    file; any other kind of file (a block device, a socket) is refused."""
    target = Path(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as err:
        raise DdlmError(f"cannot write '{path}' ({err.strerror})") from None
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        try:
            with open(target, "w") as f:
                f.write(text)
        except OSError as err:
            raise DdlmError(f"could not write '{path}' ({err.strerror})") from None
        return
    if not stat.S_ISREG(mode):
        raise ConfigError(f"--out '{path}' is neither a regular file, a character device nor a FIFO; "
                          f"name a file such as samples.jsonl")
    try:
        _replace_atomically(target, text)
    except OSError as err:
        raise DdlmError(f"could not write '{path}' ({err.strerror}); an earlier file there is unchanged") from None


def _replace_atomically(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
