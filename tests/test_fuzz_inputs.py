"""Property-based: bad overrides, bad config files and malformed input files (CSV, JSONL,
text) each end in success or a named error with exit code 2, never a traceback or a hang.

Every case runs ``ptft ... --dry-run`` in-process (nothing starts). The number of cases per
property is ``PTFT_FUZZ_EXAMPLES`` (default 25, the CI run); a longer local run:
``PTFT_FUZZ_EXAMPLES=500 pytest tests/test_fuzz_inputs.py``.
"""

from __future__ import annotations

import os
import string
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from preflight_helpers import make_model_dir

from ptft_dist import config as C
from ptft_dist.cli import main

EXAMPLES = int(os.environ.get("PTFT_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # two shared cores: time is asserted per case instead
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
CASE_LIMIT_S = 30.0
FIELDS = sorted({name for cls in C.COMMANDS.values() for name, *_ in C.field_docs(cls)})


def _ptft(args: list[str], capsys) -> tuple[int, str]:
    start = time.perf_counter()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse: a bad command line
        rc = e.code
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    assert took < CASE_LIMIT_S, f"{args} took {took:.1f} s"
    assert rc in (0, 2), f"{args}: exit {rc}\n{err}"
    assert "Traceback" not in err
    if rc == 2:
        assert err.strip(), f"{args}: exit 2 without a message"
        assert len(err.strip().splitlines()) <= 3 or err.lstrip().startswith("usage:"), err
    return rc, err


# --------------------------------------------------------------------------- overrides

segment = st.one_of(
    st.sampled_from(sorted({p for f in FIELDS for p in f.split(".")})),
    st.text(string.ascii_lowercase + "_", min_size=1, max_size=8),
    st.integers(0, 6).map(str),
)
key = st.one_of(
    st.sampled_from(FIELDS),
    st.lists(segment, min_size=1, max_size=5).map(".".join),
    st.sampled_from(FIELDS).map(lambda f: f[:-1] if len(f) > 3 else f + "x"),  # typos
)
value = st.one_of(
    st.sampled_from(["", "null", "true", "-1", "0", "1e30", "nan", "inf", "[]", "{}", "[1, 2", "{a: [b]}", "'x'"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(string.printable, max_size=20),
)
override = st.one_of(st.tuples(key, value).map("=".join), st.text(string.printable, max_size=15))


@FUZZ
@given(command=st.sampled_from(["pretrain", "finetune", "pipeline", "data"]), overrides=st.lists(override, max_size=4))
def test_bad_overrides_end_in_a_named_error_or_success(command, overrides, capsys):
    args = ["data", "build"] if command == "data" else [command]
    _ptft([*args, "--dry-run", "--fields-only", *overrides], capsys)


# --------------------------------------------------------------------------- config files

leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(), st.text(max_size=10))
yaml_value = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(segment, st.sampled_from(FIELDS)), inner, max_size=4),
    ),
    max_leaves=12,
)
document = st.dictionaries(st.one_of(segment, st.sampled_from(FIELDS)), yaml_value, max_size=5)


@FUZZ
@given(
    command=st.sampled_from(["pretrain", "finetune", "pipeline"]),
    content=st.one_of(
        document.map(lambda d: __import__("yaml").safe_dump(d)),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.text(max_size=200),
    ),
)
def test_bad_config_files_end_in_a_named_error_or_success(command, content, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "c.yaml")
        path.write_text(content, encoding="utf-8", errors="surrogateescape")
        rc, err = _ptft([command, "--dry-run", "--fields-only", "--config", str(path)], capsys)
        if rc == 2 and "YAML" in err:
            assert str(path) in err


# --------------------------------------------------------------------------- input files

cell = st.one_of(
    st.sampled_from(["pos", "neg", "", '"', '""', ",", "\t", "\n", "\\", "\x00", "é", "null"]),
    st.text(max_size=12),
)


@st.composite
def csv_bytes(draw):
    header = draw(st.sampled_from(["text,label", "label,text", "text", "sentence,label", "", "text,label,extra"]))
    rows = draw(st.lists(st.lists(cell, min_size=0, max_size=4).map(",".join), max_size=12))
    body = "\n".join([header, *rows]).encode("utf-8", "surrogatepass")
    return body + draw(st.sampled_from([b"", b"\n", b"\xff\xfe", b"\r\n"]))


@st.composite
def jsonl_bytes(draw):
    import json

    objs = draw(
        st.lists(
            st.one_of(
                st.fixed_dictionaries({"text": st.text(max_size=20), "label": st.sampled_from(["a", "b", 1, None])}),
                st.dictionaries(st.text(max_size=5), leaf, max_size=3),
                leaf,
            ),
            max_size=12,
        )
    )
    lines = [json.dumps(o) for o in objs]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["{", "nope", '{"text": "x"', "[1,"])))
    return "\n".join(lines).encode()


@pytest.fixture(scope="module")
def base_model(tiny_dataset, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("fuzzmodel") / "m", tiny_dataset / "tokenizer")


@FUZZ
@given(
    kind=st.sampled_from(["csv", "tsv", "jsonl", "txt", "csv.gz"]),
    content=st.one_of(csv_bytes(), jsonl_bytes(), st.binary(max_size=300)),
)
def test_malformed_input_files_end_in_a_named_error_or_success(kind, content, base_model, capsys):
    import gzip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"in.{kind}")
        path.write_bytes(gzip.compress(content) if kind.endswith(".gz") else content)
        run = ["--run-dir", str(Path(tmp, "run"))]
        _ptft(["data", "build", "--dry-run", *run, f"data.inputs=[{path}]"], capsys)
        if kind != "csv.gz":
            task = [f"task.train_file={path}", f"base_model={base_model}", "optim.global_batch_size=2"]
            task += ["optim.micro_batch_size_per_rank=1"]
            _ptft(["finetune", "--dry-run", *run, *task], capsys)
        assert not Path(tmp, "run").exists()
