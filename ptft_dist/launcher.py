"""Running recipes on Ray Train: the only module that imports ``ray``.

``session()`` joins a running cluster (``--address`` / ``RAY_ADDRESS``) or starts one in this
process. ``fit()`` runs a recipe on ``num_workers`` TorchTrainer workers: each builds its
World from the Ray Train context, resumes from the checkpoint Ray hands it (after a worker
failure), and reports every checkpoint with ``ray.train.report``.

The embedded cluster (no address) is lean: it leaves out what a one-machine session does not
need and what would take CPU from its workers (``lean()``); ``PTFT_RAY_DASHBOARD=1`` starts
it with Ray's defaults instead, the dashboard included.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from . import progress
from .config import ConfigError, ScalingConfig, from_dict, to_dict, worker_counts

log = logging.getLogger(__name__)

#: Environment passed to every Ray worker when set in the driver.
PASS_ENV = (
    "TORCH_EXTENSIONS_DIR",
    "PYTHONWARNINGS",
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "HF_HOME",
    "DS_ACCELERATOR",
)


def _job_env_keys() -> set[str]:
    """Variables the enclosing Ray job's runtime_env already sets (under ``ray job submit``).

    Ray refuses a ``ray.init`` runtime_env that sets any of them again ("Failed to merge the
    Job's runtime env"); the job's values already reach every worker.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def _env_vars(use_gpu: bool, embedded: bool = False) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if embedded:
        # Read by Ray Train's controller: no actor polling for node drains, which only a
        # cluster manager (KubeRay, an autoscaler, `ray drain-node`) announces.
        env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    taken = _job_env_keys()
    return {k: v for k, v in env.items() if k not in taken}


#: Whether the Ray session open now is the embedded local cluster, started lean (``session``).
_lean_session = False


def lean() -> bool:
    """Whether an embedded local cluster leaves out Ray's background work that a one-machine
    session does not use (default), or starts with Ray's defaults (``PTFT_RAY_DASHBOARD=1``).

    Left out, each costing CPU time that the training processes lose (measured in
    docs/performance.md, "Where a step's time goes"): the dashboard and its state API, metrics
    collection and task events (what the dashboard shows; nothing else reads them here),
    Ray Train's preemption watcher, placement-group cleaner and dataset manager actors, the
    autoscaling coordinator of a fixed-size run (there is no autoscaler to ask; an elastic run
    keeps it), and the log monitor's file scan ten times a second. A joined cluster
    (``--address``) is left as it is.
    """
    return os.environ.get("PTFT_RAY_DASHBOARD", "") in ("", "0", "false")


#: ray.init(_system_config=...) of the lean embedded cluster: no metrics export from every Ray
#: process to the dashboard agent, no task-event reports to the GCS every second.
LEAN_SYSTEM_CONFIG = {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}


@contextlib.contextmanager
def session(address: str | None = None, *, num_cpus: int | None = None, use_gpu: bool = False):
    """A Ray session: joins ``address`` (or ``RAY_ADDRESS``), else starts a local cluster
    in-process, lean (``lean()``) or, with ``PTFT_RAY_DASHBOARD=1``, with its dashboard bound to
    127.0.0.1. Shuts down what it started."""
    import ray

    global _lean_session
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    embedded_lean = not address and lean()
    runtime_env = {"env_vars": _env_vars(use_gpu, embedded=embedded_lean)}
    # The driver prints compact progress lines (progress.Monitor); the workers' and Ray's own
    # lines stay in the session's log files unless PTFT_RAY_LOGS=1 (`ptft --ray-logs`).
    kwargs: dict[str, Any] = dict(
        runtime_env=runtime_env, log_to_driver=ray_logs(), logging_level=logging.WARNING, configure_logging=True
    )
    if address:
        log.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            # Ray sends its token to an explicit address only when asked to.
            hint = (
                ""
                if os.environ.get("RAY_AUTH_MODE") == "token"
                else (
                    "; if the cluster uses token authentication (Ray's default when a token exists),"
                    " set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                )
            )
            raise ConnectionError(f"{e}{hint}") from None
    elif embedded_lean:
        # Everything local listens on loopback only. No dashboard: it hosts the state API,
        # which only Ray Train's placement-group cleaner polls (fit() leaves the cleaner out).
        # The log monitor (it forwards log lines to a driver that asks for them) globs the
        # log directory every 0.1 s while there are few files; this makes it every 0.5 s.
        with _environ(RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=None if ray_logs() else "0"):
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                dashboard_host="127.0.0.1",  # Ray's small API server still starts
                _node_ip_address="127.0.0.1",
                _system_config=LEAN_SYSTEM_CONFIG,
                **kwargs,
            )
        _lean_session = True
    else:
        # Ray's defaults (PTFT_RAY_DASHBOARD=1): the dashboard on 127.0.0.1:8265.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    try:
        yield
    finally:
        _lean_session = False
        started = [] if address else _node_processes()
        ray.shutdown()
        _reap(started)


#: Seconds the processes of an embedded session get to exit after ``ray.shutdown()``.
REAP_GRACE_S = 5.0


def _node_processes() -> list:
    """Every process of the Ray node this process started, collected while they run: GCS,
    raylet, Ray's agents, and every worker the raylet started (actors, Train workers, Ray
    Train's controllers)."""
    import psutil
    from ray._private import worker as ray_worker  # the node this process started (Ray 2.60)

    node = ray_worker._global_node
    procs = []
    for infos in (node.all_processes if node is not None else {}).values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(info.process.pid)
                procs += [top, *top.children(recursive=True)]
    return procs


def _reap(procs: list) -> None:
    """Kill what is left of an embedded session ``REAP_GRACE_S`` after ``ray.shutdown()``.

    ``ray.shutdown()`` stops GCS and the raylet; their workers are meant to exit when the
    raylet goes. A Ray Train ``TrainController`` sometimes does not: it lives on, reparented
    to init, with about 490 MB resident and a few timers, until the machine restarts (six
    after one test-suite run and one benchmark run). Only processes of this session are touched
    (psutil refuses a pid that was reused since)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=REAP_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            log.debug("killing %s (pid %d): still running after ray.shutdown()", proc.name(), proc.pid)
            proc.kill()
    psutil.wait_procs(alive, timeout=REAP_GRACE_S)


@contextlib.contextmanager
def _environ(**values: str | None):
    """Environment variables set (those not None and not set already) for the processes that
    start inside the block, and unset again after it."""
    added = {k: v for k, v in values.items() if v is not None and k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def ray_logs() -> bool:
    """Whether the workers' and Ray's log lines come to the driver's console."""
    return os.environ.get("PTFT_RAY_LOGS", "") not in ("", "0", "false")


def _waiting(scaling: ScalingConfig):
    """What a job that has not started yet waits for: None, or a sentence about resources."""
    import ray
    import ray.util

    def waiting() -> str | None:
        pending = [
            pg for pg in ray.util.placement_group_table().values() if pg.get("state") in ("PENDING", "RESCHEDULING")
        ]
        if not pending:
            return None
        free = ray.available_resources()
        gpus = f", {free.get('GPU', 0):g} GPU" if scaling.use_gpu else ""
        return (
            f"{scaling.num_workers} workers x {scaling.cpus_per_worker:g} CPU{' + 1 GPU' if scaling.use_gpu else ''}; "
            f"free now: {free.get('CPU', 0):g} CPU{gpus} ({len(pending)} placement group(s) pending)"
        )

    return waiting


def check_resources(scaling: ScalingConfig, section: str = "") -> None:
    """Fail fast when the cluster can never hold the workers (instead of waiting forever).
    ``section`` prefixes the field names in the message (``finetune[trec6]``)."""
    import ray

    field = f"{section}.scaling" if section else "scaling"
    total = ray.cluster_resources()
    fewest = worker_counts(scaling)[0]  # an elastic run starts on as many as there is room for
    name = "min_workers" if fewest < scaling.num_workers else "num_workers"
    need_cpu = fewest * scaling.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"{field}: {fewest} workers x {scaling.cpus_per_worker:g} CPUs = {need_cpu:g} CPUs, "
            f"but the Ray cluster has {total.get('CPU', 0):g}; lower {field}.{name} or {field}.cpus_per_worker"
        )
    if scaling.use_gpu and total.get("GPU", 0) < fewest:
        raise ConfigError(f"{field}: {fewest} GPU workers, but the Ray cluster has {total.get('GPU', 0):g} GPUs")


def _worker_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train

    from .world import World

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    world = World(
        rank=ctx.get_world_rank(),
        local_rank=ctx.get_local_rank(),
        world_size=ctx.get_world_size(),
        node_rank=ctx.get_node_rank(),
    )
    # Where each rank landed. Ray numbers nodes by IP, so node_rank alone cannot tell two
    # Ray nodes on one host apart; the node id can.
    log.info(
        "rank %d/%d on Ray node %s (node_rank %d, local_rank %d, host %s, ip %s)",
        world.rank,
        world.world_size,
        ray.get_runtime_context().get_node_id(),
        world.node_rank,
        world.local_rank,
        socket.gethostname(),
        ray.util.get_node_ip_address(),
    )
    module = importlib.import_module(config["recipe"])
    cls = getattr(importlib.import_module("ptft_dist.config"), config["config_class"])
    cfg = from_dict(cls, config["cfg"])

    def report(directory: str, metrics: dict) -> None:
        # Collective: every rank reports its own part; Ray Train merges them.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        module.run(cfg, world, on_checkpoint=report)
        return
    with ckpt.as_directory() as resume_dir:
        module.run(cfg, world, resume_dir=resume_dir, on_checkpoint=report)


def fit(recipe: str, cfg: Any, *, name: str) -> Any:
    """Run ``ptft_dist.recipes.<recipe>.run`` on Ray Train workers; returns Ray's Result.

    ``cfg`` has ``run_dir``, ``scaling`` and (optionally) ``checkpoint`` sections; paths in it
    must be absolute, since workers do not share the driver's working directory.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    check_resources(cfg.scaling)
    keep = cfg.checkpoint.keep_last if hasattr(cfg, "checkpoint") else 1
    sizes = worker_counts(cfg.scaling)
    elastic = {"elastic_resize_monitor_interval_s": cfg.scaling.resize_interval_s} if len(sizes) > 1 else {}
    if elastic and not cfg.scaling.max_failures:
        log.warning(
            "scaling.min_workers=%d < num_workers=%d but scaling.max_failures=0: the run can grow, but a lost worker "
            "ends it; set scaling.max_failures (-1: no limit) to go on with fewer",
            sizes[0],
            sizes[-1],
        )
    # Ray Train's controller reads it from the driver's environment when the trainer is made
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.scaling.start_timeout_s:g}"
    trainer_cls = _lean_trainer() if _lean_session else TorchTrainer
    trainer = trainer_cls(
        _worker_loop,
        train_loop_config={
            "recipe": f"ptft_dist.recipes.{recipe}",
            "config_class": type(cfg).__name__,
            "cfg": to_dict(cfg),
        },
        scaling_config=RayScaling(
            num_workers=(sizes[0], sizes[-1]) if elastic else cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
            placement_strategy=cfg.scaling.placement_strategy,
            **elastic,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(cfg.run_dir, "ray").resolve()),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
        ),
    )
    label = f"{name}[{cfg.name}]" if recipe == "finetune" else name
    monitor = progress.Monitor(
        cfg.run_dir,
        label,
        max_steps=cfg.optim.max_steps,
        time_budget_s=getattr(cfg, "time_budget_s", None),
        waiting=_waiting(cfg.scaling),
    )
    if not ray_logs():
        log.info(
            "%s: %s workers; their logs: %s (PTFT_RAY_LOGS=1 or --ray-logs shows them here)",
            name,
            f"{sizes[0]}-{sizes[-1]} (elastic)" if elastic else sizes[-1],
            _log_dir(),
        )
    try:
        with monitor:
            return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"{recipe} failed on the workers: {_root_cause(str(e))}") from e


def _lean_trainer():
    """TorchTrainer without the helper actors that the lean embedded cluster does not use.

    Ray Train (2.60, pinned) starts them with every run and offers no switch, so this reaches
    into its internals: the callbacks of ``_create_default_callbacks`` and the scaling policy
    handed to the controller. Each left-out actor is an idle Ray process (4 to 9 CPU-ms per
    second) or worse:

    - ``PlacementGroupCleaner`` polls the state API every second for whether the controller
      is alive, to remove the run's placement group if the controller dies and the driver
      lives on; without the dashboard the poll fails and logs a warning every time. In the
      embedded cluster the placement group goes with the session.
    - ``DatasetManager`` hands out Ray Data shards; ptft streams WebDataset shards itself.
    - ``AutoscalingCoordinator`` forwards resource requests to an autoscaler, which the
      embedded cluster does not have. Only a fixed-size run drops it (Ray picks the fixed
      policy when ``scaling.min_workers`` is not set): the elastic policy reads the resources
      it may grow into from it.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class FixedSize(FixedScalingPolicy):
        """The fixed-size policy minus its resource requests to the AutoscalingCoordinator."""

        def after_controller_start(self, train_run_context) -> None:
            """Nothing to announce: the parent registers with the AutoscalingCoordinator here."""

        def _maybe_send_resource_request(self) -> None:
            """No request: there is no autoscaler to send it to."""

    class LeanTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = (PlacementGroupCleanerCallback, *(() if self.datasets else (DatasetsCallback,)))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, dropped)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = FixedSize(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LeanTrainer


def _log_dir() -> str:
    """The Ray session's log directory on the head (where the workers' output goes)."""
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")  # local session
    except Exception:
        return "the Ray dashboard's Logs page, or `ray job logs` for a submitted job"


class TrainingError(RuntimeError):
    """A run failed on its workers; the message carries the workers' own error line."""


def _root_cause(text: str) -> str:
    """The last 'SomeError: message' line of a worker traceback snippet."""
    import re

    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception)\b.*:", ln)]
    return lines[-1] if lines else text.strip().splitlines()[-1]
