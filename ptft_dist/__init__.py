"""ptft-dist: masked-LM pretraining and parameter-efficient finetuning on clusters.

The Python API, for notebooks and scripts (docs/api.md): the same steps as the CLI, with the
same checks before Ray starts.

    import ptft_dist
    cfg = ptft_dist.load_config("pretrain", "pretrain_tiny", ["data.dataset_dir=runs/data/data"])
    summary = ptft_dist.pretrain(cfg)            # {"metrics": {...}, "artifacts": {...}}

Each run function takes a config object (from :func:`load_config`, or built and changed with
``dataclasses.replace``), or the name of a preset / a YAML file plus overrides; it raises
:class:`ConfigError` or :class:`DataError` (both a :class:`UserError`) naming the field or file
before Ray starts. Heavy imports (torch, ray, deepspeed) happen inside the calls, not at
``import ptft_dist``.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError
from .data.errors import DataError
from .errors import UserError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "UserError",
    "build_data",
    "check",
    "finetune",
    "load_config",
    "pipeline",
    "pretrain",
]


def load_config(command: str, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The validated config of ``command`` (``data``, ``pretrain``, ``finetune``, ``pipeline``)
    from a preset name or YAML file (default: the command's preset) and dotted overrides."""
    from . import config as C

    return C.load(command, config, list(overrides))


def _config(command: str, cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    from . import config as C

    if cfg is None or isinstance(cfg, str):
        return C.load(command, cfg, list(overrides))
    if not isinstance(cfg, C.COMMANDS[command]):
        raise ConfigError(f"{command} needs a {C.COMMANDS[command].__name__}, got {type(cfg).__name__}")
    if overrides:
        raise ConfigError("overrides go with a preset name or file; change a config object with dataclasses.replace")
    cfg.check()
    return cfg


def check(command: str, cfg: Any = None, overrides: list[str] | tuple[str, ...] = ()):
    """What ``ptft <command> --dry-run`` checks: returns a ``preflight.Checked`` with the
    config to run (its run length in steps) and the notes (run length, examples per class)."""
    from .preflight import preflight

    return preflight(command, _config(command, cfg, overrides))


def build_data(cfg: Any = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """``ptft data build``: returns the summary (document, sample and token counts; paths)."""
    from . import jobs
    from .runs import record_driver

    run = check("data", cfg, overrides).cfg
    with record_driver(run.run_dir, "data build"):
        return jobs.build_data(run.data, run.run_dir)


def pretrain(cfg: Any = None, overrides: list[str] | tuple[str, ...] = (), *, address: str | None = None) -> dict:
    """``ptft pretrain`` on Ray Train (a local cluster in this process unless ``address``);
    returns summary.json's content. Raises ``jobs.Preempted`` when stopped by SIGTERM."""
    from . import jobs
    from .runs import record_driver

    run = check("pretrain", cfg, overrides).cfg
    with record_driver(run.run_dir, "pretrain"):
        return jobs.pretrain(run, address=address)


def finetune(cfg: Any = None, overrides: list[str] | tuple[str, ...] = (), *, address: str | None = None) -> dict:
    """``ptft finetune`` on Ray Train; returns summary.json's content (test accuracy, macro-F1...)."""
    from . import jobs
    from .runs import record_driver

    run = check("finetune", cfg, overrides).cfg
    with record_driver(run.run_dir, "finetune"):
        return jobs.finetune(run, address=address)


def pipeline(cfg: Any = None, overrides: list[str] | tuple[str, ...] = (), *, address: str | None = None) -> dict:
    """``ptft pipeline``: data build, pretraining and the finetune jobs in one Ray session."""
    from . import jobs
    from .runs import record_driver

    run = check("pipeline", cfg, overrides).cfg
    with record_driver(run.run_dir, "pipeline"):
        return jobs.pipeline(run, address=address)
