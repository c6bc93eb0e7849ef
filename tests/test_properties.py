"""Property-based tests (hypothesis): for any config value, CLI argument, prompt or corpus, ddlm
either runs or refuses with a DdlmError whose message is one line (exit status 2 from the CLI)."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddlm.cli import main
from ddlm.config import SECTIONS, make_config
from ddlm.errors import DdlmError
from ddlm.methods.base import method_names

FIELDS = [f"{section}.{name}" for section, cls in SECTIONS.items()
          for name in cls.__dataclass_fields__ if name not in ("vocab_size", "max_len")]
VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.booleans(), st.sampled_from(["", "0", "-1", "1e9", "nan", "auto"]))
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(err: Exception) -> bool:
    text = str(err)
    return bool(text) and "\n" not in text and "Traceback" not in text


@QUICK
@given(field=st.sampled_from(FIELDS), value=VALUES, method=st.sampled_from(method_names()))
def test_any_config_value_builds_or_is_one_line(field, value, method):
    try:
        make_config(base={"method": method}, overrides={field: str(value)})
    except DdlmError as err:
        assert one_line(err), err


@QUICK
@given(key=st.text(min_size=1, max_size=20), value=st.text(max_size=10))
def test_any_option_name_builds_or_is_one_line(key, value):
    try:
        make_config(overrides={key: value})
    except DdlmError as err:
        assert one_line(err), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("props")
    os.environ.setdefault("DDLM_CACHE", str(root / "cache"))
    out = root / "run"
    assert main(["train", "--method", "ar", "--out", str(out), "--steps", "1", "--json", "--model.dim=32",
                 "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16", "--train.batch_size=4",
                 "--train.eval_every=0", "--train.progress=false"]) == 0
    return out


SAMPLE_FLAGS = st.sampled_from(["--num", "--length", "--steps", "--seed", "--top-k", "--top-p",
                                "--temperature", "--sample.batch_size", "--sample.stride", "--sampler"])
SMALL = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(["abc", "", "1.5", "-0.0", "nan", "inf",
                                                                 "1e300", "0x10", "ancestral"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(SAMPLE_FLAGS, SMALL), min_size=1, max_size=3))
def test_any_sampling_arguments_run_or_exit_2_with_one_line(trained, capsys, flags):
    args = ["sample", str(trained), "--json"]
    for flag, value in flags:
        args += [flag, value] if not flag.startswith("--sample.") else [f"{flag}={value}"]
    code = main(args)
    out, err = capsys.readouterr()
    if code == 0:
        result = json.loads(out.strip().splitlines()[-1])
        assert len(result["texts"]) >= 1
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("ddlm: error: "), err


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=40))
def test_any_prompt_runs_or_exit_2_with_one_line(trained, capsys, prompt):
    code = main(["sample", str(trained), "--num", "1", "--length", "2", "--prompt", prompt, "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("ddlm: error: "), err


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=400), st.binary(max_size=400)),
       tokenizer=st.sampled_from(["char", "byte"]))
def test_any_corpus_trains_or_is_one_line(tmp_path_factory, text, tokenizer):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "c.txt"
    corpus.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    try:
        from ddlm.build import prepare_data

        run = make_config(overrides={"data.corpus": str(corpus), "data.tokenizer": tokenizer,
                                     "data.seq_len": "8"})
        prepare_data(run)
    except DdlmError as err:
        assert one_line(err), err
