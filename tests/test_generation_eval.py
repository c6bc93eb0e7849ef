"""Sample statistics and judge scoring (ddlm/eval/generation.py) against hand-computed values and
direct network calls."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddlm.eval.generation import (cut_at_eos, judge_nll, known_word_rate, repetition_rate, sample_statistics,
                                  token_nll, unigram_entropy, words)
from ddlm.eval.judges import ArJudge, Judge

from conftest import tiny_transformer

BOS = 0


def test_statistics_match_hand_counts():
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert repetition_rate([1, 2, 1, 2, 1, 2]) == pytest.approx(1 / 3)  # (1,2,1,2) seen again once of 3
    stats = sample_statistics([[1, 1, 1], [1, 2, 3]])
    assert stats.distinct[1] == pytest.approx(3 / 6)
    assert stats.distinct[2] == pytest.approx(3 / 4)  # (1,1) twice, (1,2), (2,3)
    assert stats.unigram_entropy == pytest.approx(math.log(3) / 2)
    assert stats.repetition == 0.0


def test_known_word_rate_counts_inner_words_against_the_lexicon():
    lexicon = {"the", "cat", "sat", "on", "mat"}
    assert words("The cat's 2 mats!") == ["the", "cat", "s", "mats"]
    # inner words only: "cat sat on" of the first text (3 known), "xqz the" of the second (1 of 2)
    assert known_word_rate(["ht cat sat on th", "at xqz the ma"], lexicon) == pytest.approx(4 / 5)
    assert known_word_rate(["the cat sat on the mat"], lexicon) == 1.0
    assert math.isnan(known_word_rate(["the cat", "mat"], lexicon))  # no inner words at all


def logits_of(model):
    return lambda ids: model(ids, mask="causal")[0]


def causal_model():
    """A plain causal tiny backbone whose logits depend on the left context (perturbed gates)."""
    model = tiny_transformer(vocab=11, max_len=8, n_layers=2).eval()
    return model


@torch.no_grad()
def direct_nll(model, ids, j, window_start):
    """-log p(ids[j] | BOS-shifted inputs window_start..j), one network call."""
    inputs = torch.tensor([BOS] + ids[:-1])[window_start:j + 1]
    logits = model(inputs[None], mask="causal")[0, -1]
    return float(F.cross_entropy(logits.double()[None], torch.tensor([ids[j]])))


def test_text_within_the_context_is_scored_in_one_pass():
    model = causal_model()
    ids = [3, 5, 7, 2, 9, 4]
    nll = token_nll(logits_of(model), ids, start_id=BOS, context=8)
    for j in range(len(ids)):
        assert float(nll[j]) == pytest.approx(direct_nll(model, ids, j, 0), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("stride", [1, 3, 4, 8])
def test_longer_text_slides_a_window_scoring_each_token_once_with_enough_left_context(stride):
    """Token j >= C is scored in the window starting at the first multiple of the stride w with
    w + C > j: its left context is j - w >= C - stride inputs (the whole context when C = stride)."""
    model, C = causal_model(), 8
    ids = [(3 * j + 1) % 10 + 1 for j in range(27)]
    nll = token_nll(logits_of(model), ids, start_id=BOS, context=C, stride=stride)
    assert nll.shape == (27,)
    for j in range(len(ids)):
        w = 0 if j < C else stride * math.ceil((j - C + 1) / stride)
        assert j - w >= min(j, C - stride)
        assert float(nll[j]) == pytest.approx(direct_nll(model, ids, j, w), rel=1e-5, abs=1e-5), (j, w)


class _Judge(Judge):
    """A judge over the tiny backbone: one token per character, end token 10."""

    name, context, start_id, end_id = "tiny", 8, BOS, 10

    def __init__(self, model):
        self.model = model

    def encode(self, text):
        return [1 + (ord(c) % 9) for c in text]

    @torch.no_grad()
    def logits(self, ids):
        return self.model(ids, mask="causal")[0]


def test_judge_score_is_token_weighted_and_per_byte():
    model = causal_model()
    judge = _Judge(model)
    texts = ["hello world", "ab", "é"]  # the last is 2 UTF-8 bytes, 1 token
    score = judge_nll(judge, texts)
    per_text = [token_nll(logits_of(model), judge.encode(t), start_id=BOS, context=8) for t in texts]
    total = sum(float(x.sum()) for x in per_text)
    assert score.tokens == 11 + 2 + 1 and score.bytes == 11 + 2 + 2
    assert score.nll == pytest.approx(total)
    assert score.gen_ppl == pytest.approx(math.exp(total / 14))  # not the mean of per-text perplexities
    assert score.gen_ppl != pytest.approx(sum(math.exp(float(x.mean())) for x in per_text) / 3)
    assert score.bits_per_byte == pytest.approx(total / math.log(2) / 15)


def test_eos_ended_text_scores_the_judges_end_token_after_it():
    model = causal_model()
    judge = _Judge(model)
    plain, ended = judge_nll(judge, ["abc", "de"]), judge_nll(judge, ["abc", "de"], ended=[True, False])
    ids = judge.encode("abc")
    with torch.no_grad():
        logits = model(torch.tensor([[BOS] + ids]), mask="causal")[0, -1]
    end_nll = float(F.cross_entropy(logits.double()[None], torch.tensor([judge.end_id])))
    assert ended.tokens == plain.tokens + 1 and ended.bytes == plain.bytes
    assert ended.nll == pytest.approx(plain.nll + end_nll, rel=1e-6)


def test_cut_at_eos_keeps_the_prompt_and_stops_at_the_first_eos_after_it():
    rows = [[5, 0, 3, 4, 0, 2], [5, 0, 3, 4], [1, 2]]
    cut, ended = cut_at_eos(rows, eos_id=0, start=2)
    assert cut == [[5, 0, 3, 4], [5, 0, 3, 4], [1, 2]] and ended == [True, False, False]
    assert cut_at_eos([[3, 0, 1]], eos_id=0)[0] == [[3]]


def test_prompted_text_is_scored_as_a_continuation():
    """With prompts, only the continuation's tokens count, each conditioned on the prompt."""
    model = causal_model()
    judge = _Judge(model)
    score = judge_nll(judge, ["fgh"], prompts=["abcd"])
    whole = token_nll(logits_of(model), judge.encode("abcdfgh"), start_id=BOS, context=8)
    assert score.tokens == 3 and score.bytes == 3
    assert score.nll == pytest.approx(float(whole[4:].sum()), rel=1e-6)
    assert score.nll != pytest.approx(judge_nll(judge, ["fgh"]).nll, rel=1e-3)


def test_cli_sample_reports_statistics_and_the_judge(tmp_path, monkeypatch, capsys):
    import json

    from ddlm.build import load_for_inference
    from ddlm.cli import main

    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 300)
    tiny = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16",
            "--train.batch_size=4", "--train.eval_every=0", "--train.threads=1", "--json"]
    for method in ("ar", "mdlm"):
        assert main(["train", "--method", method, "--data", str(corpus), "--out", str(tmp_path / method),
                     "--steps", "3", *tiny]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "mdlm"), "--num", "3", "--steps", "4", "--length", "40",
                 "--judge", f"ar:{tmp_path / 'ar'}", "--json", "--out", str(tmp_path / "s.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats, judge = result["statistics"], result["judge"]
    assert 0 < stats["unigram_entropy"] and set(stats["distinct"]) == {"1", "2", "3", "4"}
    judged = ArJudge(load_for_inference(tmp_path / "ar"), "ar")
    rows = [json.loads(line)["tokens"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    body, ended = cut_at_eos(rows, judged.end_id)
    texts = [judged.loaded.tokenizer.decode(r) for r in body]
    expected = judge_nll(judged, texts, ended=ended)  # past the 16-token context
    assert judge["nll"] == pytest.approx(expected.nll) and judge["tokens"] == expected.tokens > 0
    assert judge["gen_ppl"] == pytest.approx(math.exp(judge["nll"] / judge["tokens"]))
    assert main(["sample", str(tmp_path / "mdlm"), "--num", "1", "--judge", f"ar:{tmp_path / 'mdlm'}"]) == 2
    assert "not an AR run" in capsys.readouterr().err
