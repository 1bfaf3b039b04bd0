"""Checkpoint layout: the DeepSpeed engine (every rank's ZeRO shard, under ``ds/``), one
``train_state_rank<r>.json`` per rank (step, samples seen, data position, RNG seeds), and the
resolved config. The launcher decides where the directory goes (under Ray: every rank
reports its own directory and Ray Train merges them into one checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .world import World

log = logging.getLogger(__name__)

TAG = "ds"
VERSION = 1


def save(engine, directory: str | Path, world: World, train_state: dict[str, Any], config_yaml: str) -> Path:
    """Write this rank's part of a checkpoint. Collective: every rank must call it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(out), tag=TAG, client_state={"version": VERSION})
    state = dict(train_state, version=VERSION, world_size=world.world_size, rank=world.rank)
    (out / f"train_state_rank{world.rank}.json").write_text(json.dumps(state))
    if world.is_rank_zero:
        (out / "config.yaml").write_text(config_yaml)
    return out


def load(engine, directory: str | Path, world: World) -> dict[str, Any]:
    """Restore the engine and return this rank's train state. Collective.

    Raises:
        ValueError: the checkpoint was written by a different world size (resuming on another
            world size is not supported yet: restart from the exported model instead).
    """
    path = Path(directory)
    state_file = path / f"train_state_rank{world.rank}.json"
    if not state_file.is_file():
        raise ValueError(f"checkpoint {path} has no {state_file.name}: it was written by fewer ranks or is incomplete")
    state = json.loads(state_file.read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path}: version {state.get('version')!r}, this ptft-dist reads version {VERSION}")
    if state["world_size"] != world.world_size:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} ranks, this run has {world.world_size}; "
            "resume with the same scaling.num_workers, or start a new run from an export (model.init_from)"
        )
    engine.load_checkpoint(str(path), tag=TAG)
    log.info("resumed from %s at step %d", path, state["step"])
    return state
