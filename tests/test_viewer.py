"""Watching a model write: the recorder replays the sampler's exact history (same seed, same
sample; the last frame is the sample), infilling keeps every given token at every step, and the
HTML page shows the sample's text in a real browser at its first and last frame."""
from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess

import pytest
import torch
from conftest import tiny_built

from ddlm.cli import main
from ddlm.config import SampleConfig
from ddlm.errors import DdlmError
from ddlm.methods.base import method_names
from ddlm.sampling.infill import close_open_spans, parse_infill
from ddlm.sampling.trace import Recorder
from ddlm.viewer.frames import MASK_GLYPH, merge_draws, text_of, timeline, token_pieces, used_ids
from ddlm.viewer.html import page
from ddlm.viewer.terminal import TerminalView

TINY = {"dim": 32, "n_layers": 1, "n_heads": 2}
SEQ = 16


def built(name: str):
    run, tokenizer, method, model = tiny_built(name, TINY, SEQ, seed=0, perturb=0.3)
    return run, tokenizer, method, model.eval()


def draw(method, model, *, recorder=None, template=None, n=3, length=SEQ, seed=7, **options):
    cfg = SampleConfig(steps=6, **options)
    sampler = method.sampler(cfg)
    sampler.recorder = recorder
    gen = torch.Generator().manual_seed(seed)
    if template is not None:
        return sampler.generate(model, n, 0, template=template, generator=gen)
    return sampler.generate(model, n, length, generator=gen)


@pytest.mark.parametrize("name", method_names())
def test_recording_changes_nothing_and_ends_on_the_sample(name):
    _, _, method, model = built(name)
    plain = draw(method, model)
    recorder = Recorder()
    watched = draw(method, model, recorder=recorder)
    assert torch.equal(plain.tokens, watched.tokens) and plain.nfe == watched.nfe
    frames = recorder.frames
    assert torch.equal(frames[-1].tokens, watched.tokens)
    assert not frames[-1].note.get("final")  # the sampler's own last step already shows the sample
    assert len(frames) > 2  # the start, the steps, the end
    assert (frames[0].tokens == method.mask_id).all()
    nfes = [f.nfe for f in frames]
    assert nfes == sorted(nfes) and nfes[-1] == watched.nfe


@pytest.mark.parametrize("name", ["mdlm", "bd3"])
def test_frames_unmask_monotonically(name):
    """Absorbing samplers never remask: a position once written keeps its token in every later frame."""
    _, _, method, model = built(name)
    recorder = Recorder()
    draw(method, model, recorder=recorder)
    grids = [f.tokens for f in recorder.frames]
    for before, after in zip(grids, grids[1:]):
        written = before != method.mask_id
        assert torch.equal(after[written], before[written])


def test_past_the_context_windows_land_in_place():
    _, _, method, model = built("mdlm")
    recorder = Recorder()
    gen = draw(method, model, recorder=recorder, length=2 * SEQ + 5)
    assert gen.tokens.shape[1] == 2 * SEQ + 5
    assert torch.equal(recorder.frames[-1].tokens, gen.tokens) and not recorder.frames[-1].note.get("final")
    assert all(f.tokens.shape == gen.tokens.shape for f in recorder.frames)


def test_edlm_frames_name_the_kept_proposal():
    run, _, method, model = built("edlm")
    recorder = Recorder()
    draw(method, model, recorder=recorder)
    chosen = [f.note["chosen"] for f in recorder.frames if "chosen" in f.note]
    assert chosen and all(0 <= j < method.cfg.k for c in chosen for j in c.values())


def test_batches_merge_side_by_side():
    _, _, method, model = built("mdlm")
    recorder = Recorder()
    first, second = draw(method, model, recorder=recorder, n=2), draw(method, model, recorder=recorder, n=1, seed=3)
    merged = merge_draws(recorder.draws)
    assert torch.equal(merged[-1].tokens, torch.cat([first.tokens, second.tokens]))
    assert merged[-1].nfe == first.nfe + second.nfe


# ---------------------------------------------------------------------------------- infilling

@pytest.mark.parametrize("name", ["mdlm", "sedd", "bd3", "edlm"])
def test_infill_never_changes_a_given_token(name):
    _, tokenizer, method, model = built(name)
    template = parse_infill("a truth[MASK:3] know[MASK]", tokenizer)
    ids = torch.tensor(template.ids)
    given = ids != method.mask_id
    recorder = Recorder()
    gen = draw(method, model, recorder=recorder, template=ids)
    for frame in recorder.frames:
        assert (frame.tokens[:, given] == ids[given]).all()
    assert (gen.tokens != method.mask_id).all()


def test_ar_refuses_infill_in_one_line():
    _, tokenizer, method, model = built("ar")
    template = torch.tensor(parse_infill("ab[MASK:2]cd", tokenizer).ids)
    with pytest.raises(DdlmError) as err:
        draw(method, model, template=template)
    assert "\n" not in str(err.value)


def test_infill_syntax():
    _, tokenizer, _, _ = built("mdlm")
    template = parse_infill("It is [MASK:3] a [MASK] b[MASK:?]", tokenizer, open_span=4)
    mask = tokenizer.mask_id
    assert template.ids.count(mask) == 3 + 1 + 4
    assert [(s.length, s.open) for s in template.spans] == [(3, False), (1, False), (4, True)]
    pieces = ("It is ", " a ", " b")  # encoded one by one: no merge or normalisation across a span
    assert tokenizer.decode([t for t in template.ids if t != mask]) == "".join(map(tokenizer.normalize, pieces))
    for bad in ("no span here", "x [MASK:0] y", "x [MASK:-3]", "x [MASK:abc]", "x [MASK y"):
        with pytest.raises(DdlmError) as err:
            parse_infill(bad, tokenizer)
        assert "\n" not in str(err.value)


def test_open_span_ends_at_its_first_eos():
    _, tokenizer, _, _ = built("mdlm")
    template = parse_infill("ab[MASK:?]cd", tokenizer, open_span=4)
    eos = tokenizer.eos_id
    filled = template.ids[:2] + [5, eos, 6, 7] + template.ids[-2:]
    assert close_open_spans(filled, template, eos, tokenizer.pad_id) == template.ids[:2] + [5] + template.ids[-2:]
    no_eos = template.ids[:2] + [5, 6, 7, 8] + template.ids[-2:]
    assert close_open_spans(no_eos, template, eos, tokenizer.pad_id) == no_eos


# --------------------------------------------------------------------------- the two viewers

def test_terminal_view_draws_every_frame_on_a_terminal():
    _, tokenizer, method, model = built("mdlm")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    recorder = Recorder(on_frame=TerminalView(tokenizer, title="t", stream=out, min_interval=0.0))
    gen = draw(method, model, recorder=recorder, n=1)
    screens = [re.sub(r"\x1b\[[0-9;]*m", "", s) for s in out.getvalue().split("\x1b[H\x1b[2J")[1:]]
    assert len(screens) == len(recorder.frames)
    assert MASK_GLYPH * SEQ in screens[0]
    last = screens[-1]
    assert tokenizer.decode(gen.tokens[0].tolist()) in last and f"NFE {gen.nfe}" in last


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


def dom_texts(browser: str, url: str, profile) -> list[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", url]
    dom = subprocess.run([browser, *flags], capture_output=True, text=True, timeout=120).stdout
    bodies = re.findall(r'<pre class="sample" id="sample-\d+">(.*?)</pre>', dom, flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", body)) for body in bodies]


def test_page_in_a_real_browser_shows_the_sample(tmp_path):
    browser = chromium()
    _, tokenizer, method, model = built("mdlm")
    recorder = Recorder()
    gen = draw(method, model, recorder=recorder, n=2)
    line = timeline(recorder.frames)
    path = tmp_path / "view.html"
    path.write_text(page(line, tokenizer, title="test", meta={"method": "mdlm"}))
    assert "http" not in path.read_text().replace("http-equiv", "")  # nothing fetched from anywhere
    first = dom_texts(browser, f"file://{path}#frame=0", tmp_path / "profile")
    last = dom_texts(browser, f"file://{path}#frame=last", tmp_path / "profile")
    assert first == [MASK_GLYPH * SEQ] * 2
    assert last == [tokenizer.decode(row) for row in gen.tokens.tolist()]
    middle = dom_texts(browser, f"file://{path}#frame={line.frames // 2}", tmp_path / "profile")
    pieces = token_pieces(tokenizer, used_ids(line))
    assert middle == [text_of(row, pieces) for row in line.tokens_at(line.frames // 2)]


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer") / "mdlm"
    assert main(["train", "--method", "mdlm", "--out", str(out), "--steps", "2", "--json", "--model.dim=32",
                 "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=64", "--train.batch_size=2",
                 "--train.log_every=1", "--train.eval_every=0"]) == 0
    return out


def test_cli_show_html_and_infill(mdlm_run, tmp_path, capsys):
    capsys.readouterr()
    page_path = tmp_path / "watch.html"
    assert main(["sample", str(mdlm_run), "--num", "2", "--steps", "8", "--seed", "1", "--json",
                 "--infill", "It is a truth [MASK:6] acknowledged", "--show-html", str(page_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(t.startswith("it is a truth ") and t.endswith(" acknowledged") for t in result["texts"])  # char: lower case
    text = page_path.read_text()
    data = json.loads(re.search(r'id="ddlm-data">(.*?)</script>', text, re.S).group(1).replace("<\\/", "</"))
    assert len(data["start"]) == 2 and data["nfe"][-1] == result["nfe"]
    assert main(["sample", str(mdlm_run), "--num", "2", "--steps", "8", "--seed", "1", "--json",
                 "--infill", "It is a truth [MASK:6] acknowledged"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == result["texts"]  # watching changes nothing


def test_cli_infill_errors_are_one_line(mdlm_run, capsys):
    for args in (["--infill", "no spans"], ["--infill", "a [MASK:x] b"], ["--infill", "a [MASK] b", "--prompt", "hi"],
                 ["--infill", "x [MASK:4000] y"]):
        assert main(["sample", str(mdlm_run), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ddlm: error:"), err


def test_show_html_into_a_directory_names_its_own_flag(mdlm_run, tmp_path, capsys):
    assert main(["sample", str(mdlm_run), "--show-html", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddlm: error: --show-html '{tmp_path}' is a directory; name a file such as writing.html"
    assert main(["sample", str(mdlm_run), "--show-html", str(tmp_path / "no" / "w.html")]) == 2
    assert capsys.readouterr().err.startswith(f"ddlm: error: --show-html '{tmp_path / 'no' / 'w.html'}': directory")


# ------------------------------------------------------------------------ --infill-test

def test_span_masks_leave_context_on_both_sides():
    from ddlm.eval.infill_test import span_masks

    masks = span_masks(200, 12, 4, torch.Generator().manual_seed(0))
    assert (masks.sum(1) == 4).all() and not masks[:, 0].any() and not masks[:, -1].any()
    first = masks.int().argmax(1)
    assert torch.equal(masks, (torch.arange(12)[None] >= first[:, None]) & (torch.arange(12)[None] < first[:, None] + 4))
    assert len(set(first.tolist())) == 12 - 4 - 1  # every start in 1..L-S-1 occurs
    with pytest.raises(DdlmError):
        span_masks(1, 12, 11, torch.Generator())


def test_infill_test_scores_the_span_given_its_context(mdlm_run, tmp_path, capsys):
    from ddlm.build import load_for_inference, prepare_data
    from ddlm.eval.infill_test import span_masks

    assert main(["eval", str(mdlm_run), "--infill-test", "6", "--infill-span", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == "both" and out["tokens"] == 6 * 5 and out["sequences"] == 6 and not out["exact"]
    ar = tmp_path / "ar"
    assert main(["train", "--method", "ar", "--out", str(ar), "--steps", "2", "--json", "--model.dim=32",
                 "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=64", "--train.batch_size=2",
                 "--train.eval_every=0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(ar), "--infill-test", "6", "--infill-span", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == "left" and out["exact"]
    loaded = load_for_inference(ar)  # the exact NLL of each span given what precedes it, computed here
    _, data = prepare_data(loaded.run, loaded.tokenizer)
    x0 = torch.tensor(data["test"].tokens[:6], dtype=torch.long)
    spans = span_masks(6, 64, 5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = loaded.method.token_nll(loaded.model, x0).double()[spans].sum() / 30
    assert out["nll_per_token"] == pytest.approx(float(nll), rel=1e-4)
