import subprocess
import sys

import pytest

from ptft_dist import config as C
from ptft_dist.ds_config import deepspeed_config


@pytest.mark.parametrize("preset", C.list_presets())
def test_every_shipped_preset_loads_and_opens_with_its_launch_command(preset):
    path = C.preset_path(preset)
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("#"), f"{preset} must open with a comment"
    assert any(line.startswith("# Launch: ptft ") for line in head), f"{preset} must give its launch command"
    command = next(line for line in head if line.startswith("# Launch: ptft ")).split()[3]
    C.load({"data": "data", "pretrain": "pretrain", "finetune": "finetune", "pipeline": "pipeline"}[command], preset)


def test_defaults_exist_for_every_command():
    for command in C.COMMANDS:
        cfg = C.load(command)
        assert cfg.run_dir


def test_unknown_key_names_the_field():
    with pytest.raises(C.ConfigError, match=r"unknown field 'model\.hidden'"):
        C.load("pretrain", overrides=["model.hidden=3"])


def test_wrong_type_names_field_and_value():
    with pytest.raises(C.ConfigError, match=r"optim\.lr must be a number, got 'fast'"):
        C.load("pretrain", overrides=["optim.lr=fast"])
    with pytest.raises(C.ConfigError, match=r"zero\.stage must be 0, 1, 2 or 3, got 5"):
        C.load("pretrain", overrides=["zero.stage=5"])
    with pytest.raises(C.ConfigError, match=r"model\.family must be one of"):
        C.load("pretrain", overrides=["model.family=gpt"])


def test_batch_arithmetic_is_validated_once_with_every_factor():
    with pytest.raises(C.ConfigError) as e:
        C.load(
            "pretrain",
            overrides=["optim.global_batch_size=24", "optim.micro_batch_size_per_rank=8", "scaling.num_workers=2"],
        )
    msg = str(e.value)
    assert "optim.global_batch_size=24" in msg and "micro_batch_size_per_rank=8" in msg and "num_workers=2" in msg
    cfg = C.load("pretrain", overrides=["optim.global_batch_size=64", "optim.micro_batch_size_per_rank=8"])
    assert C.grad_accum_steps(cfg.optim, cfg.scaling) == 4


def test_an_elastic_batch_must_divide_at_every_world_size_and_the_failing_sizes_are_named():
    elastic = ["scaling.num_workers=4", "scaling.min_workers=2", "optim.micro_batch_size_per_rank=8"]
    with pytest.raises(C.ConfigError) as e:
        C.load("pretrain", overrides=[*elastic, "optim.global_batch_size=64"])
    msg = str(e.value)
    assert "cannot be split over 3 workers" in msg and "min_workers=2..scaling.num_workers=4" in msg
    assert "multiple of 96" in msg
    cfg = C.load("pretrain", overrides=[*elastic, "optim.global_batch_size=96"])
    assert list(C.worker_counts(cfg.scaling)) == [2, 3, 4]
    line = C.batch_arithmetic(cfg.optim, cfg.scaling)
    assert "elastic 2-4 workers, accumulation 6 at 2, 4 at 3, 3 at 4" in line
    assert C.grad_accum_steps(cfg.optim, C.at_world_size(cfg.scaling, 3)) == 4
    with pytest.raises(C.ConfigError, match=r"scaling\.min_workers must be between 1 and scaling\.num_workers=4"):
        C.load("pretrain", overrides=[*elastic, "scaling.min_workers=5"])
    with pytest.raises(C.ConfigError, match=r"elastic scaling is for pretraining"):
        C.load("finetune", overrides=["scaling.num_workers=2", "scaling.min_workers=1"])


def test_pipeline_errors_name_the_nested_section():
    with pytest.raises(C.ConfigError, match=r"pretrain\.optim\.global_batch_size=10"):
        C.load("pipeline", overrides=["pretrain.optim.global_batch_size=10"])


def test_overrides_parse_yaml_values_and_keep_section_defaults():
    cfg = C.load("finetune", overrides=["optim.lr=3e-4", "peft.target_modules=[query, value]", "tracking.wandb=true"])
    assert cfg.optim.lr == 3e-4
    assert cfg.peft.target_modules == ["query", "value"]
    assert cfg.tracking.wandb is True
    # a section given partly keeps the command's own defaults for the rest
    partial = C.from_dict(C.FinetuneConfig, {"optim": {"lr": 1e-4}})
    assert partial.optim.max_steps == C.FinetuneConfig().optim.max_steps


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load("pretrain", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load("pretrain", str(bad))


def test_yaml_is_data_not_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(C.ConfigError):
        C.load("pretrain", str(evil))


def test_deepspeed_config_is_derived():
    cfg = C.load(
        "pretrain", overrides=["zero.stage=3", "optim.global_batch_size=64", "optim.micro_batch_size_per_rank=8"]
    )
    ds = deepspeed_config(cfg.optim, cfg.zero, cfg.scaling, on_gpu=False)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg.optim, cfg.zero, cfg.scaling, on_gpu=True)["bf16"]["enabled"] is True
    with pytest.raises(C.ConfigError, match="offload_params needs zero.stage=3"):
        C.load("pretrain", overrides=["zero.offload_params=true"])


def test_every_field_is_documented():
    for cls in C.COMMANDS.values():
        for name, _, _, doc in C.field_docs(cls):
            assert doc, f"{cls.__name__}.{name} has no doc"


def _ptft(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ptft_dist.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_config_error_is_one_paragraph_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = _ptft("pretrain", "--run-dir", str(run_dir), "model.bogus=1")
    assert proc.returncode == 2
    assert "unknown field 'model.bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_cli_dry_run_prints_config_arithmetic_and_deepspeed_json():
    proc = _ptft("pretrain", "--dry-run", "--fields-only", "zero.stage=3")
    assert proc.returncode == 0, proc.stderr
    assert "global batch 16 = 8 per rank x 1 accumulation x 2 workers" in proc.stdout
    assert '"stage": 3' in proc.stdout
    proc = _ptft("pipeline", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "# pretrain:" in proc.stdout and "# finetune trec6:" in proc.stdout


def test_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    from ptft_dist.docgen import render

    committed = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert committed == render(), "docs/config.md is stale: run `python -m ptft_dist.docgen > docs/config.md`"


def test_a_finetune_job_that_would_restart_from_step_0_is_refused():
    with pytest.raises(C.ConfigError, match=r"scaling.max_failures=1: finetune jobs write no checkpoints"):
        C.load("finetune", None, ["scaling.max_failures=1"])
    with pytest.raises(C.ConfigError, match=r"finetune\[0\]\.scaling\.max_failures=2"):
        C.load("pipeline", "pipeline_tiny", ["finetune.0.scaling.max_failures=2"])


def test_values_are_strict_and_errors_name_the_list_index():
    with pytest.raises(C.ConfigError, match=r"^finetune\[1\]\.optim\.lr must be a number, got 'fast'$"):
        C.load("pipeline", overrides=["finetune.1.name=b", "finetune.1.optim.lr=fast"])
    with pytest.raises(C.ConfigError, match=r"^zero\.stage must be an integer, got 2\.0$"):
        C.load("pretrain", overrides=["zero.stage=2.0"])
    with pytest.raises(C.ConfigError, match=r"^tracking\.wandb must be true or false, got 1$"):
        C.load("pretrain", overrides=["tracking.wandb=1"])
    with pytest.raises(C.ConfigError, match=r"^run_dir must be a string, got 3$"):
        C.load("pretrain", overrides=["run_dir=3"])
    # YAML 1.1 reads 3e-4 (no dot) as a string; a float field takes it as the number
    assert C.from_dict(C.OptimConfig, {"lr": "3e-4", "betas": [1, "0.5"]}).lr == 3e-4
    with pytest.raises(C.ConfigError, match=r"^optim\.lr must be a number, got True$"):
        C.load("pretrain", overrides=["optim.lr=true"])


def test_config_deepspeed_and_redaction_modules_import_no_torch():
    code = (
        "import sys; import ptft_dist.config, ptft_dist.ds_config, ptft_dist.redaction, ptft_dist.schema; "
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed', 'wandb') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_user_errors_are_one_family_and_still_value_errors():
    from ptft_dist.data.errors import DataError
    from ptft_dist.errors import UserError
    from ptft_dist.report import ReportError
    from ptft_dist.runs import RunsError

    for error in (C.ConfigError, DataError, ReportError, RunsError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)


def test_every_scalar_field_is_strict():
    """A plain ``int``/``bool``/``str``/``float`` annotation would let pydantic coerce ("3" -> 3,
    1 -> true): every scalar field is a StrictInt, StrictBool, StrictStr or C.Number."""
    import dataclasses
    import typing

    def loose(tp):
        if typing.get_origin(tp) is typing.Annotated:
            base, *meta = typing.get_args(tp)
            return [] if any(getattr(m, "strict", False) for m in meta) else loose(base)
        if tp in (int, bool, str, float):
            return [tp.__name__]
        return [name for arg in typing.get_args(tp) for name in loose(arg)]

    found, todo, seen = [], list(C.COMMANDS.values()), set()
    while todo:
        cls = todo.pop()
        seen.add(cls)
        for name, tp in typing.get_type_hints(cls, include_extras=True).items():
            sections = [a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and dataclasses.is_dataclass(a)]
            todo += [s for s in sections if s not in seen]
            if not sections:
                found += [f"{cls.__name__}.{name}: {kind}" for kind in loose(tp)]
    assert not found, found
