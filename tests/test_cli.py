"""The command line: configs to start from (config show / cp, loading back identically), the
dry-run's YAML, presets, help texts, did-you-mean and list-index hints, --version, shell
completion, and the Python API. Every command here runs in-process or in a child without Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import ptft_dist
from ptft_dist import config as C
from ptft_dist.cli import config_yaml, main


def _ptft(*args):
    return subprocess.run([sys.executable, "-m", "ptft_dist.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset", C.list_presets())
def test_config_cp_writes_a_yaml_that_loads_back_identically(preset, tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert main(["config", "cp", preset, str(out)]) == 0
    info = C.preset_info(preset)
    assert C.load(info.command, str(out)) == C.load(info.command, preset)
    text = out.read_text()
    assert f"# Launch: ptft {'data build' if info.command == 'data' else info.command} --config {out}" in text
    assert "# Peak learning rate (AdamW)." in text or info.command == "data"  # the field docs are comments
    assert main(["config", "cp", preset, str(out)]) == 2  # never overwritten without --force
    assert "exists" in capsys.readouterr().err
    assert main(["config", "cp", "--force", preset, str(out), "run_dir=elsewhere"]) == 0
    assert C.load(info.command, str(out)).run_dir == "elsewhere"


def test_config_show_prints_the_same_text(capsys):
    assert main(["config", "show", "finetune_tiny"]) == 0
    assert capsys.readouterr().out == config_yaml("finetune_tiny")[0]
    assert main(["config", "show", "nope"]) == 2
    assert "no preset named 'nope'" in capsys.readouterr().err


def test_dry_run_output_is_yaml_that_loads_back(tmp_path, capsys):
    """`ptft pipeline --dry-run > my.yaml && ptft pipeline --config my.yaml`: the extras are comments."""
    assert main(["pipeline", "--dry-run", "finetune.0.optim.max_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "# finetune trec6: run length (optim.max_epochs=1.0): 170 steps" in out
    assert '#   "train_batch_size": 32,' in out
    mine = tmp_path / "my.yaml"
    mine.write_text(out)
    assert C.load("pipeline", str(mine)) == C.load("pipeline", None, ["finetune.0.optim.max_epochs=1"])


def test_presets_say_command_purpose_and_launch_line(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "pretrain_tiny" in out and "A tiny ModernBERT masked LM" in out
    assert "$ ptft pretrain --config pretrain_tiny data.dataset_dir=runs/data/data" in out
    assert "data_wikitext2         data build" in out


def test_unknown_fields_get_a_did_you_mean():
    with pytest.raises(C.ConfigError, match="unknown field 'optim.lrr'; did you mean 'lr'"):
        C.load("pretrain", None, ["optim.lrr=3"])
    with pytest.raises(C.ConfigError, match="did you mean 'scaling'"):
        C.load("pretrain", None, ["scalling.num_workers=3"])
    with pytest.raises(C.ConfigError) as e:
        C.load("pretrain", None, ["optim.zzzzz=3"])
    assert "did you mean" not in str(e.value)
    with pytest.raises(C.ConfigError, match=r"got 'bf61'; did you mean 'bf16'\?$"):
        C.load("pretrain", None, ["zero.precision=bf61"])
    with pytest.raises(C.ConfigError, match="no preset named 'pretrain_tinny'; did you mean 'pretrain_tiny'"):
        C.load("pretrain", "pretrain_tinny")


def test_list_indices_are_checked():
    with pytest.raises(C.ConfigError, match=r"the job named 'trec6' is finetune.0: finetune.0.optim.lr=\.\.\."):
        C.load("pipeline", None, ["finetune.trec6.optim.lr=3"])
    with pytest.raises(C.ConfigError, match=r"give an index \(0 \(trec6\)\), e.g. finetune.0.optim.lr"):
        C.load("pipeline", None, ["finetune.lora.optim.lr=3"])
    with pytest.raises(C.ConfigError, match="index 5 would add 5 entries; use an existing index, or 1 to add one"):
        C.load("pipeline", None, ["finetune.5.optim.lr=3"])
    cfg = C.load("pipeline", None, ["finetune.1.name=second"])  # one past the end adds a job
    assert [j.name for j in cfg.finetune] == ["trec6", "second"]
    two = C.load("pipeline", "pipeline_tiny", ["finetune.1.optim.lr=0.5"])
    assert two.finetune[1].optim.lr == 0.5 and two.finetune[0].optim.lr != 0.5


def test_each_command_has_its_own_help_and_error_prefix():
    build = _ptft("data", "build", "--help")
    assert "check the inputs (every glob matches" in build.stdout
    assert "batch arithmetic" not in build.stdout and "--ray-logs" not in build.stdout
    assert "a Ray cluster to tokenize on" in " ".join(build.stdout.split())  # its own --address
    assert "ptft data build --run-dir runs/data" in build.stdout
    pre = _ptft("pretrain", "--help")
    assert "steps = epochs = tokens" in pre.stdout and "--address" in pre.stdout
    bad = _ptft("data", "build", "--dry-run", "data.seq_lenn=3")
    assert bad.returncode == 2 and bad.stderr.startswith("ptft data build: error: unknown field 'data.seq_lenn'")
    assert "did you mean 'seq_len'" in bad.stderr


def test_version_and_shell_completion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ptft {ptft_dist.__version__}"
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete" in script and "pretrain" in script and "presets" in script and "--dry-run" in script
    bash = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash.returncode == 0, bash.stderr


def test_fields_only_skips_the_file_checks_of_a_dry_run_only(capsys):
    assert main(["pretrain", "--dry-run", "--fields-only", "data.dataset_dir=/on/the/cluster"]) == 0
    assert "files not checked (--fields-only)" in capsys.readouterr().out
    assert main(["pretrain", "--fields-only"]) == 2
    assert "--fields-only goes with --dry-run" in capsys.readouterr().err


def test_python_api_loads_and_checks_like_the_cli(tmp_path):
    cfg = ptft_dist.load_config("finetune", "finetune_tiny", ["optim.max_epochs=1"])
    assert isinstance(cfg, C.FinetuneConfig)
    with pytest.raises(ptft_dist.DataError, match="base_model is not set"):
        ptft_dist.finetune(cfg)  # checked before Ray starts: nothing ran
    with pytest.raises(ptft_dist.ConfigError, match="needs a PretrainConfig"):
        ptft_dist.pretrain(cfg)
    with pytest.raises(ptft_dist.DataError, match="matches no file"):
        ptft_dist.build_data("data_wikitext2", [f"data.inputs=[{tmp_path}/*.txt]"])
    checked = ptft_dist.check("pipeline", "pipeline_tiny")
    assert any("training examples per class" in n for n in checked.notes)
    assert yaml.safe_load(C.dump_yaml(checked.cfg))["finetune"][0]["optim"]["max_steps"] == 30
