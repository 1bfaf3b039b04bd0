"""The driver side of each command: prepare the run directory, start or join Ray, run the
recipe on the workers, return the summary. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import DataBuildConfig, FinetuneConfig, PipelineConfig, PretrainConfig, dump_yaml

log = logging.getLogger(__name__)


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else path


def prepare_run_dir(run_dir: str | Path, cfg: Any) -> Path:
    """Create the run directory and write the resolved ``config.yaml`` into it."""
    out = Path(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
    except OSError as e:
        raise OSError(f"run directory {out} is not writable: {e.strerror}") from None
    return out


def _read_summary(run_dir: str | Path, what: str, result: Any = None) -> dict:
    path = Path(run_dir, "summary.json")
    if result is not None and getattr(result, "error", None):
        raise RuntimeError(f"{what} failed: {result.error}")
    if not path.is_file():
        raise RuntimeError(f"{what} ended without writing {path}; see the worker logs above")
    return json.loads(path.read_text())


def build_data(cfg: DataBuildConfig, run_dir: str | Path) -> dict:
    """``ptft data build``: returns the summary (the dataset's manifest counts)."""
    from .data.build import build

    out_dir = Path(cfg.output_dir or Path(run_dir, "data"))
    start = time.perf_counter()
    manifest = build(cfg, out_dir)
    splits = manifest["splits"]
    summary = {
        "metrics": {
            f"{split}_{key}": splits[split][key] for split in splits for key in ("num_documents", "num_samples", "num_tokens")
        }
        | {"build_time_s": time.perf_counter() - start, "vocab_size": manifest["vocab_size"]},
        "artifacts": {"dataset": str(out_dir.resolve()), "tokenizer": str((out_dir / "tokenizer").resolve())},
    }
    from .tracking import write_summary

    write_summary(run_dir, summary["metrics"], summary["artifacts"])
    return summary


def _resolve_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    return dataclasses.replace(
        cfg,
        run_dir=_abs(cfg.run_dir),
        data=dataclasses.replace(cfg.data, dataset_dir=_abs(cfg.data.dataset_dir)),
        model=dataclasses.replace(cfg.model, init_from=_abs(cfg.model.init_from)),
    )


def _resolve_finetune(cfg: FinetuneConfig) -> FinetuneConfig:
    from .data.labeled import resolve_task

    return dataclasses.replace(cfg, run_dir=_abs(cfg.run_dir), base_model=_abs(cfg.base_model), task=resolve_task(cfg.task, cfg.run_dir))


def pretrain(cfg: PretrainConfig, *, address: str | None = None) -> dict:
    """``ptft pretrain`` on Ray Train; returns summary.json's content."""
    from . import launcher

    cfg = _resolve_pretrain(cfg)
    prepare_run_dir(cfg.run_dir, cfg)
    with launcher.session(address, use_gpu=cfg.scaling.use_gpu):
        result = launcher.fit("pretrain", cfg, name="pretrain")
    return _read_summary(cfg.run_dir, "pretraining", result)


def finetune(cfg: FinetuneConfig, *, address: str | None = None) -> dict:
    """``ptft finetune`` on Ray Train; returns summary.json's content."""
    from . import launcher

    cfg = _resolve_finetune(cfg)
    prepare_run_dir(cfg.run_dir, cfg)
    with launcher.session(address, use_gpu=cfg.scaling.use_gpu):
        result = launcher.fit("finetune", cfg, name="finetune")
    return _read_summary(cfg.run_dir, "finetuning", result)


def export(checkpoint_dir: str | Path, out_dir: str | Path) -> dict:
    """``ptft export``: an HF directory from any pretraining checkpoint (or a run directory,
    whose newest complete checkpoint is used), in this process, without Ray."""
    import yaml

    from . import checkpoint, models
    from .config import from_dict
    from .data.build import load_tokenizer, read_manifest

    source = Path(checkpoint_dir)
    ckpt = source if (source / "train_state_rank0.json").is_file() else checkpoint.latest(source)
    if ckpt is None:
        raise ValueError(f"{source} holds no complete ptft-dist checkpoint (no train_state_rank0.json below it)")
    cfg = from_dict(PretrainConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
    manifest = read_manifest(cfg.data.dataset_dir)
    hf_config = models.mlm_config(cfg.model, vocab_size=manifest["vocab_size"], special_ids=manifest["tokenizer"]["special_ids"])
    model = models.build_mlm(cfg.model, hf_config)
    state = checkpoint.consolidated_state_dict(ckpt, cfg.zero.stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "decoder" not in k]:  # tied decoder weights may be absent
        raise ValueError(f"checkpoint {ckpt} does not match its config.yaml: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = load_tokenizer(Path(cfg.data.dataset_dir, manifest["tokenizer"]["dir"]))
    models.save_hf(model, model.state_dict(), tokenizer, out_dir)
    step = checkpoint.read_state(ckpt)["step"]
    log.info("exported %s (step %d) to %s", ckpt, step, out_dir)
    return {"metrics": {"step": step}, "artifacts": {"hf_model": str(Path(out_dir).resolve()), "checkpoint": str(ckpt)}}


def pipeline(cfg: PipelineConfig, *, address: str | None = None) -> dict:
    """``ptft pipeline``: data build -> pretrain -> finetune, in one Ray session."""
    from . import launcher

    root = Path(_abs(cfg.run_dir))
    data_dir = root / "data"
    group = cfg.pretrain.tracking.group or root.name  # one W&B group: finetuning shown with its pretraining
    pre = dataclasses.replace(cfg.pretrain, run_dir=str(root / "pretrain"), data=dataclasses.replace(cfg.pretrain.data, dataset_dir=str(data_dir)), tracking=dataclasses.replace(cfg.pretrain.tracking, group=group))
    fin = dataclasses.replace(cfg.finetune, run_dir=str(root / "finetune"), base_model=str(root / "pretrain" / "export"), tracking=dataclasses.replace(cfg.finetune.tracking, group=cfg.finetune.tracking.group or group))
    cfg = dataclasses.replace(cfg, run_dir=str(root), pretrain=pre, finetune=fin)
    prepare_run_dir(root, cfg)
    # Check the labeled data before spending minutes on pretraining.
    fin = _resolve_finetune(fin)
    with launcher.session(address, use_gpu=pre.scaling.use_gpu or fin.scaling.use_gpu):
        log.info("[1/3] building the dataset in %s", data_dir)
        data_summary = build_data(dataclasses.replace(cfg.data, output_dir=str(data_dir)), root / "data_build")
        log.info("[2/3] pretraining")
        pre_summary = pretrain(pre)
        log.info("[3/3] finetuning")
        fin_summary = finetune(fin)
    summary = {
        "metrics": {"data": data_summary["metrics"], "pretrain": pre_summary["metrics"], "finetune": fin_summary["metrics"]},
        "artifacts": {**data_summary["artifacts"], **pre_summary["artifacts"], **fin_summary["artifacts"]},
    }
    from .tracking import write_summary

    write_summary(root, summary["metrics"], summary["artifacts"])
    return summary
