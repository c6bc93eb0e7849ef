"""Sample statistics and scoring generated text under a judge (docs/methods.md §7, trap 4).

    sample_statistics(token_lists)        unigram entropy (nats), distinct-n, repetition rate
    judge_nll(judge, texts, ended=...)    a judge's NLL of the texts (ddlm/eval/judges.py):
                                          token-weighted generative perplexity and bits per byte
    cut_at_eos(rows, eos_id)              samples cut at their first EOS, and which ended there
    known_word_rate(texts, lexicon)       share of the samples' words that occur in a lexicon
                                          (the training text's words): "does it write words?"

Generative perplexity is exp(sum of NLL / number of judge tokens) over all samples, never a mean of
per-sample perplexities. Beside it, bits per byte (the NLL over the UTF-8 bytes of the text) does
not depend on how the judge tokenises, so it does not reward letter soup that splits into many
short tokens. Low entropy flatters both: report the unigram entropy with them.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class SampleStatistics:
    unigram_entropy: float  # nats, per sample over its own tokens, averaged over samples
    distinct: dict  # n -> unique n-grams / all n-grams, pooled over the samples
    repetition: float  # share of a sample's 4-grams already seen earlier in it, averaged

    def as_dict(self) -> dict:
        return asdict(self)


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy in nats of the token frequencies of one sample (0 for an empty sample)."""
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Share of the sample's n-grams that already occurred earlier in the same sample."""
    seen, repeats, grams = set(), 0, ngrams(tokens, n)
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def sample_statistics(samples: list[list[int]], orders: tuple[int, ...] = (1, 2, 3, 4)) -> SampleStatistics:
    if not samples:
        raise ValueError("no samples to describe")
    distinct = {}
    for n in orders:
        grams = [g for s in samples for g in ngrams(s, n)]
        distinct[n] = len(set(grams)) / len(grams) if grams else 0.0
    return SampleStatistics(unigram_entropy=sum(map(unigram_entropy, samples)) / len(samples),
                            distinct=distinct,
                            repetition=sum(map(repetition_rate, samples)) / len(samples))


def words(text: str) -> list[str]:
    """The lower-cased runs of letters of a text (digits, punctuation and spaces separate them)."""
    return re.findall(r"[^\W\d_]+", text.lower())


def known_word_rate(texts: list[str], lexicon: set[str]) -> float:
    """Share of the texts' words found in `lexicon`, pooled over texts. A text's first and last
    word are left out: a window cut from running text (or a sample of one) may start or end inside
    a word. NaN when no text has three words or more."""
    inner = [w for text in texts for w in words(text)[1:-1]]
    return sum(w in lexicon for w in inner) / len(inner) if inner else float("nan")


@dataclass
class JudgeScore:
    nll: float  # nats, summed over every judge token of every text
    tokens: int  # judge tokens scored
    bytes: int  # UTF-8 bytes of the texts
    gen_ppl: float  # exp(nll / tokens)
    bits_per_byte: float  # nll / ln 2 / bytes
    per_text: dict | None = None  # {"nll", "tokens", "bytes"}: one entry per text (for error bars)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def token_nll(logits_fn, ids: list[int], *, start_id: int, context: int,
              stride: int | None = None) -> torch.Tensor:
    """(len(ids),) float64 NLL of each token under a causal model (`logits_fn`: (1, n) ids ->
    (n, V) next-token logits) that sees `start_id` then the text. Past the context a window of
    `context` inputs slides by `stride` (default context // 2): every token is scored once, with at
    least context - stride tokens of left context after the first window."""
    stride = stride or max(1, context // 2)
    inputs = torch.tensor([start_id] + ids[:-1], dtype=torch.long)  # inputs[j] predicts ids[j]
    targets = torch.tensor(ids, dtype=torch.long)
    out = torch.empty(len(ids), dtype=torch.float64)
    scored, start = 0, 0
    while scored < len(ids):
        end = min(start + context, len(ids))
        logits = logits_fn(inputs[start:end][None]).cpu()
        nll = F.cross_entropy(logits.double(), targets[start:end], reduction="none")
        out[scored:end] = nll[scored - start:]
        scored, start = end, start + stride
    return out


def judge_nll(judge, texts: list[str], *, ended: list[bool] | None = None,
              prompts: list[str] | None = None, stride: int | None = None) -> JudgeScore:
    """Score decoded texts under a judge (ddlm/eval/judges.py): each text is re-encoded with the
    judge's tokenizer and scored after the judge's document-start token; a text that `ended` with
    the generator's EOS also has the judge's end token scored after it (counted as a token; no
    byte). With `prompts`, text i is scored as the continuation of prompt i (the prompt's tokens
    are context, not counted)."""
    ended = ended or [False] * len(texts)
    nlls, counts, sizes = [0.0] * len(texts), [0] * len(texts), [0] * len(texts)
    short = []  # (index, inputs, targets, n_context) of texts within the judge's context: batched
    for i, text in enumerate(texts):
        context_ids = judge.encode(prompts[i]) if prompts else []
        ids = judge.encode(text) + ([judge.end_id] if ended[i] and judge.end_id is not None else [])
        sizes[i] = len(text.encode("utf-8"))
        if not ids:
            continue
        counts[i] = len(ids)
        full = context_ids + ids
        if len(full) <= judge.context:
            short.append((i, [judge.start_id] + full[:-1], full, len(context_ids)))
            continue
        nll = token_nll(judge.logits, full, start_id=judge.start_id, context=judge.context, stride=stride)
        nlls[i] = float(nll[len(context_ids):].sum())
    for (i, inputs, targets, skip), logits in zip(short, judge.logits_many([row[1] for row in short])):
        nll = F.cross_entropy(logits.double().cpu(), torch.tensor(targets), reduction="none")
        nlls[i] = float(nll[skip:].sum())
    total, count, size = math.fsum(nlls), sum(counts), sum(sizes)
    return JudgeScore(nll=total, tokens=count, bytes=size,
                      gen_ppl=math.exp(total / count) if count else float("nan"),
                      bits_per_byte=total / math.log(2) / size if size else float("nan"),
                      per_text={"nll": nlls, "tokens": counts, "bytes": sizes})


def cut_at_eos(rows: list[list[int]], eos_id: int, start: int = 0) -> tuple[list[list[int]], list[bool]]:
    """Each row up to its first EOS at or after `start` (what follows is another document), and
    whether it ended there."""
    cut, ended = [], []
    for row in rows:
        stop = next((j for j in range(start, len(row)) if row[j] == eos_id), None)
        cut.append(row if stop is None else row[:stop])
        ended.append(stop is not None)
    return cut, ended
