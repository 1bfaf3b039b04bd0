"""Checkpoint layout: the DeepSpeed engine (every rank's ZeRO shard, under ``ds/``), one
``train_state_rank<r>.json`` per rank (step, samples seen, data read position, tokenizer
hash), one ``rng_rank<r>.pt`` per rank (torch, numpy and Python RNG states), and the resolved
``config.yaml``. The launcher decides where the directory goes (under Ray: every rank reports
its own directory and Ray Train merges them into one checkpoint).

A checkpoint is complete when every rank's ``train_state_rank<r>.json`` is present: each rank
writes that file last, after its engine shard.

A checkpoint written by N ranks resumes on M ranks: the ZeRO shards (stages 1-3) go through
DeepSpeed's universal checkpoint format (``ds_to_universal``, converted once per node when the
run resumes, loaded with ``checkpoint.load_universal``); a stage-0 checkpoint holds the whole
model and optimizer already. The read positions of all N ranks are handed to the data stream,
which splits what no rank had consumed among the M new ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .world import World, barrier

log = logging.getLogger(__name__)

TAG = "ds"
VERSION = 1


@dataclass
class TrainState:
    """Where a run stands, beyond the engine's own state: written by every rank into every
    checkpoint (``train_state_rank<r>.json``) and read back whole on resume."""

    step: int = 0
    """Optimizer steps done."""
    samples_seen: int = 0
    """Training samples consumed, over all ranks."""
    train_time_s: float = 0.0
    """Seconds of training, this run and the runs it resumed (drives time_budget_s)."""
    nonfinite_skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss (on_nonfinite_loss: skip)."""
    data_position: dict | list[dict] | None = None
    """This rank's read position (:meth:`ptft_dist.data.stream.ShardStream.state_dict`); after a
    resume on another world size, the positions of every rank that wrote the checkpoint."""
    tokenizer_sha256: str | None = None
    wandb_run_id: str | None = None
    """Rank 0's W&B run, continued by a resumed run."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def read(cls, directory: str | Path, rank: int = 0) -> TrainState:
        return cls.from_dict(read_state(directory, rank))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2]},
        "python": repr(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))


def save(engine, directory: str | Path, world: World, train_state: TrainState, config_yaml: str) -> Path:
    """Write this rank's part of a checkpoint. Collective: every rank must call it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(out), tag=TAG, client_state={"version": VERSION})
    torch.save(_rng_state(), out / f"rng_rank{world.rank}.pt")
    if world.is_rank_zero:
        (out / "config.yaml").write_text(config_yaml)
    # the sizes of this rank's files: a copy cut short (a full disk) is seen as incomplete
    files = {
        str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file() and _owned(p.name, world.rank)
    }
    state = dict(train_state.to_dict(), version=VERSION, world_size=world.world_size, rank=world.rank, files=files)
    tmp = out / f"train_state_rank{world.rank}.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(out / f"train_state_rank{world.rank}.json")  # last: marks this rank's part complete
    return out


def _owned(name: str, rank: int) -> bool:
    """Whether a checkpoint file is written by ``rank`` (DeepSpeed names shards by rank)."""
    if f"pp_rank_{rank}_" in name or name == f"rng_rank{rank}.pt":
        return True
    return rank == 0 and (
        name == "config.yaml" or (name.endswith(".pt") and "pp_rank_" not in name and not name.startswith("rng_rank"))
    )


def is_complete(folder: str | Path) -> bool:
    """Every rank's train state is there, and every file it lists has the size it had."""
    folder = Path(folder)
    try:
        world_size = json.loads((folder / "train_state_rank0.json").read_text())["world_size"]
        for r in range(world_size):
            state = json.loads((folder / f"train_state_rank{r}.json").read_text())
            if any((folder / rel).stat().st_size != size for rel, size in state.get("files", {}).items()):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def read_state(directory: str | Path, rank: int = 0) -> dict[str, Any]:
    path = Path(directory, f"train_state_rank{rank}.json")
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} has no {path.name}: it is incomplete or was written by fewer ranks")
    return json.loads(path.read_text())


#: Config sections that must not change between a checkpoint and the run resuming it.
FROZEN_ON_RESUME = {
    "model": None,
    "zero": ("stage",),
    "optim": ("global_batch_size", "micro_batch_size_per_rank", "seed"),
    "data": ("dataset_dir", "num_loader_workers", "elastic_determinism"),
}


def written_by(directory: str | Path) -> int:
    """How many ranks wrote a checkpoint."""
    return read_state(directory, 0)["world_size"]


def check_compatible(directory: str | Path, current: dict[str, Any]) -> None:
    """Refuse to resume with a config whose model, ZeRO stage, batch or data differ from the
    checkpoint's, naming the first field that differs. (Another world size is fine.)"""
    import yaml

    saved_file = Path(directory, "config.yaml")
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text())
    for section, fields in FROZEN_ON_RESUME.items():
        old, new = saved.get(section) or {}, current.get(section) or {}
        for name in fields or sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                raise ValueError(
                    f"checkpoint {directory} was written with {section}.{name}={old.get(name)!r}, this run has "
                    f"{section}.{name}={new.get(name)!r}; resume with the checkpoint's value or use a new run dir"
                )


def load(engine, directory: str | Path, world: World) -> TrainState:
    """Restore the engine and RNG states; return this rank's train state. Collective.

    On another world size than the checkpoint's, the engine must have been built with
    ``checkpoint.load_universal`` (stages 1-3; :func:`ds_config_for_resume`), and the train
    state's ``data_position`` lists every old rank's position.

    Raises:
        ValueError: an incomplete checkpoint or another format version.
    """
    path = Path(directory)
    old_world = written_by(path)
    state = read_state(path, world.rank if world.rank < old_world else 0)
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path}: version {state.get('version')!r}, this ptft-dist reads version {VERSION}")
    if old_world == world.world_size:
        engine.load_checkpoint(str(path), tag=TAG)
    elif engine.zero_optimization_stage() == 0:  # one file holds the whole model and optimizer
        engine.load_checkpoint(str(path), tag=TAG)
        state["data_position"] = [read_state(path, r)["data_position"] for r in range(old_world)]
    else:
        universal = _universal_copy(path, world)
        try:
            engine.load_checkpoint(str(universal), tag=TAG)
            if engine.zero_optimization_stage() == 3:
                _repair_zero3_optimizer(engine, universal / TAG / "zero" / "optimizer_state.pt")
        finally:
            barrier()
            if world.local_rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        state["data_position"] = [read_state(path, r)["data_position"] for r in range(old_world)]
    rng = path / f"rng_rank{world.rank}.pt"
    if rng.is_file():  # a rank the old world did not have keeps the run's seeded generator
        _set_rng_state(torch.load(rng, weights_only=True))
    if old_world == world.world_size:
        log.info("resumed from %s at step %d", path, state["step"])
    elif world.is_rank_zero:
        log.info(
            "resumed from %s at step %d: written by %d ranks, now %d", path, state["step"], old_world, world.world_size
        )
    return TrainState.from_dict(state)


def _repair_zero3_optimizer(engine, optimizer_state: Path) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal load (``load_hp_checkpoint_state_from_
    checkpoint_dir_stage3``, up to 0.19.x): it gives every param group the hyperparameters of
    group 0 (the no-decay group got weight decay), and every sub-group one shared ``step``
    tensor, which each sub-group's optimizer step then increments in place (with 2 groups the
    step count, and so Adam's bias correction, advanced by 2 per step). The checkpoint's own
    param groups are restored, by index as torch's ``load_state_dict`` does, and each state
    gets its own step."""
    # DeepSpeed's own pickle of the merged optimizer state, loaded as DeepSpeed loads it
    saved = torch.load(optimizer_state, map_location="cpu", weights_only=False)["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {optimizer_state} has {len(saved)} optimizer param groups, the engine "
            f"{len(optimizer.param_groups)}"
        )
    for group, old in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def ds_config_for_resume(ds: dict[str, Any], directory: str | Path | None, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config to build the engine with when resuming ``directory``: with
    ``checkpoint.load_universal`` when the checkpoint comes from another world size and holds
    ZeRO shards (stages 1-3)."""
    if directory is None or written_by(directory) == world_size or ds["zero_optimization"]["stage"] == 0:
        return ds
    return dict(ds, checkpoint=dict(ds.get("checkpoint", {}), load_universal=True))


def _universal_copy(path: Path, world: World) -> Path:
    """The checkpoint's engine shards in DeepSpeed's universal format, in a temporary folder
    of this node (local rank 0 converts; the other ranks of the node wait). Collective."""
    from deepspeed.checkpoint import ds_to_universal

    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir(), f"ptft-universal-{name}")
    if world.local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        args = Namespace(
            input_folder=str(path / TAG),
            output_folder=str(out / TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # ptft's models are not Megatron's: no tensor-parallel layout to record
        )
        ds_to_universal.main(args)
        (out / "latest").write_text(TAG)
    barrier()
    return out


def consolidated_state_dict(directory: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, in one process, without a process group.

    Stage 0 keeps the whole module in ``mp_rank_00_model_states.pt`` (read with
    ``weights_only=True``); stages 1-3 are merged from every rank's shard by DeepSpeed's
    ``zero_to_fp32``, which unpickles DeepSpeed's own files: only export checkpoints you trust.
    """
    path = Path(directory)
    if not (path / TAG).is_dir():
        raise ValueError(f"{path} is not a ptft-dist checkpoint (no {TAG}/ folder)")
    if zero_stage == 0:
        states = torch.load(path / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a Ray Train run folder, or a folder of
    checkpoints); incomplete ones (a rank's train state missing, or a file shorter than
    when it was written) are skipped."""
    candidates = []
    for ckpt in Path(root).rglob("train_state_rank0.json"):
        folder = ckpt.parent
        if is_complete(folder):
            candidates.append((json.loads(ckpt.read_text())["step"], folder.stat().st_mtime, folder))
    return max(candidates)[2] if candidates else None
