"""The JSON Schema of the configs (``ptft config schema``) agrees with the loader."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from ptft_dist import config as C
from ptft_dist.schema import json_schema

PRESETS = sorted(Path(C.__file__).parent.joinpath("configs").glob("*.yaml"))


def _command(preset: Path) -> str:
    return "data" if preset.stem.startswith("data") else preset.stem.split("_")[0]


@pytest.mark.parametrize("command", list(C.COMMANDS))
def test_each_schema_is_valid_json_schema_with_a_description_per_field(command):
    schema = json_schema(command)
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert schema["additionalProperties"] is False
    assert all(p.get("description") for p in props.values()), "a field without its documentation"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_preset_validates(preset):
    data = yaml.safe_load(preset.read_text())
    errors = list(jsonschema.Draft202012Validator(json_schema(_command(preset))).iter_errors(data))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize(
    "bad",
    [{"optim": {"lrr": 1e-3}}, {"optim": {"lr": "fast"}}, {"zero": {"stage": "three"}}, {"model": {"family": "gpt"}}],
)
def test_what_the_loader_refuses_the_schema_refuses(bad):
    with pytest.raises(C.ConfigError):
        C.from_dict(C.PretrainConfig, bad)
    assert list(jsonschema.Draft202012Validator(json_schema("pretrain")).iter_errors(bad))


def test_ptft_config_schema_writes_the_schema(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "pretrain.schema.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ptft_dist.cli", "config", "schema", "pretrain", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == json_schema("pretrain")


@pytest.mark.parametrize("command", list(C.COMMANDS))
def test_every_section_of_the_schema_is_closed_and_documented(command):
    sections = json_schema(command).get("$defs", {})
    assert sections, "the sections are pydantic's $defs"
    for name, section in sections.items():
        assert section["additionalProperties"] is False, name
        undocumented = [field for field, prop in section["properties"].items() if not prop.get("description")]
        assert not undocumented, f"{name}: {undocumented}"
