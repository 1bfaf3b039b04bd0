"""The driver side of each command: prepare the run directory, start or join Ray, run the
recipe on the workers, return the summary. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .config import DataBuildConfig, FinetuneConfig, PipelineConfig, PretrainConfig, dump_yaml

log = logging.getLogger(__name__)


def _abs(path: str | None) -> str | None:
    """An absolute local path (workers do not share the driver's working directory); URLs
    (``s3://``, ``https://``) stay as they are."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


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


def build_data(
    cfg: DataBuildConfig, run_dir: str | Path, *, address: str | None = None, task_text: list[dict] | None = None
) -> dict:
    """``ptft data build``: returns the summary (the dataset's manifest counts). With a Ray
    ``address`` the tokenizing runs on that cluster (``data.engine: ray``); ``task_text``: the
    inputs a pipeline added from its finetune jobs (:func:`with_task_text`), for the manifest."""
    from .data.build import build

    if address:
        cfg = dataclasses.replace(cfg, engine="ray")
    out_dir = Path(cfg.output_dir or Path(run_dir, "data"))
    start = time.perf_counter()
    try:
        manifest = build(cfg, out_dir, address=address, task_text=task_text)
    except OSError as e:  # disk full, permissions: say where, whatever the library said
        where = f"{e.filename}" if e.filename else str(out_dir)
        raise OSError(
            e.errno,
            f"{e.strerror or e} while writing the dataset to {where} (nothing is published: the manifest is written "
            "last)",
        ) from None
    splits = manifest["splits"]
    summary = {
        "metrics": {
            f"{split}_{key}": splits[split][key]
            for split in splits
            for key in ("num_documents", "num_samples", "num_tokens")
        }
        | {"build_time_s": time.perf_counter() - start, "vocab_size": manifest["vocab_size"]},
        "artifacts": {"dataset": str(out_dir.resolve()), "tokenizer": str((out_dir / "tokenizer").resolve())},
    }
    from .tracking import write_summary

    write_summary(run_dir, summary["metrics"], summary["artifacts"])
    return summary


def _resolve_pretrain(cfg: PretrainConfig, *, check_data: bool = True) -> PretrainConfig:
    """Absolute paths; with ``check_data``, the dataset's manifest and tokenizer are checked
    here, before Ray starts (a model to continue from must use the dataset's tokenizer)."""
    from .config import max_steps_for
    from .preflight import check_dataset, with_steps

    cfg = dataclasses.replace(
        cfg,
        run_dir=_abs(cfg.run_dir),
        data=dataclasses.replace(cfg.data, dataset_dir=_abs(cfg.data.dataset_dir)),
        model=dataclasses.replace(cfg.model, init_from=_abs(cfg.model.init_from)),
    )
    if check_data:
        manifest = check_dataset(cfg.data.dataset_dir, cfg.model, on_error=cfg.data.on_error)
        train = manifest["splits"]["train"]["num_samples"]
        cfg = with_steps(cfg, max_steps_for(cfg.optim, train, manifest["seq_len"]))  # max_epochs / max_tokens
    return cfg


def _resolve_finetune(cfg: FinetuneConfig, *, check_model: bool = True) -> FinetuneConfig:
    """Absolute paths, the task files resolved and checked; with ``check_model``, the base
    model too (a pipeline's is made by its pretraining, later)."""
    from .data.labeled import resolve_task
    from .preflight import check_base_model

    if check_model:
        check_base_model(cfg)  # weights, tokenizer, pooling: said before any worker starts
    cfg = dataclasses.replace(
        cfg, run_dir=_abs(cfg.run_dir), base_model=_abs(cfg.base_model), task=resolve_task(cfg.task, cfg.run_dir)
    )
    return _with_max_length(cfg) if check_model else cfg


def _with_max_length(cfg: FinetuneConfig) -> FinetuneConfig:
    """``task.max_length`` chosen from the data here, when the config leaves it empty, and
    logged: the workers and the job's config.yaml get the number."""
    from .adapters import resolve_max_length

    cfg, note = resolve_max_length(cfg)
    if note:
        log.info("%s", note)
    return cfg


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after writing a checkpoint; the same command resumes it."""

    exit_code = 75  # EX_TEMPFAIL: try again


@contextlib.contextmanager
def _preemptible(run_dir: str | Path, grace_s: float):
    """While inside, SIGTERM asks the workers (through ``<run_dir>/STOP``) to write a
    checkpoint and stop; if they take longer than ``grace_s`` the process exits with 75.
    Only the main thread can take signals: elsewhere this does nothing."""
    import signal
    import threading

    from .progress import STOP_FILE

    stop = Path(run_dir, STOP_FILE)
    stop.unlink(missing_ok=True)  # a new start of the same command resumes, not stops
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum, frame):
        log.warning("SIGTERM: asking the workers to checkpoint and stop (grace %.0f s)", grace_s)
        stop.touch()
        timer = threading.Timer(
            grace_s,
            lambda: (
                log.error("no checkpoint within %.0f s of SIGTERM; exiting", grace_s),
                os._exit(Preempted.exit_code),
            ),
        )
        timer.daemon = True
        timer.start()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def pretrain(cfg: PretrainConfig, *, address: str | None = None) -> dict:
    """``ptft pretrain`` on Ray Train; returns summary.json's content.

    Running the same command again with the same run dir resumes from the newest checkpoint
    (Ray Train restores it from ``<run_dir>/ray/pretrain``). On SIGTERM the workers write a
    checkpoint and stop, and :class:`Preempted` is raised (the CLI exits with 75).
    """
    from . import launcher

    cfg = _resolve_pretrain(cfg)
    prepare_run_dir(cfg.run_dir, cfg)
    # the handler goes in after ray.init, which installs a SIGTERM handler of its own
    with (
        launcher.session(address, use_gpu=cfg.scaling.use_gpu),
        _preemptible(cfg.run_dir, cfg.preemption_grace_s) as stop,
    ):
        result = launcher.fit("pretrain", cfg, name="pretrain")
        if stop.exists():
            stop.unlink()
            summary = _read_summary(cfg.run_dir, "pretraining", result)
            raise Preempted(
                f"preempted at step {summary['metrics']['steps']}: a checkpoint is saved; run the same command again "
                "to resume"
            )
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
    hf_config = models.mlm_config(
        cfg.model, vocab_size=manifest["vocab_size"], special_ids=manifest["tokenizer"]["special_ids"]
    )
    model = models.build_mlm(cfg.model, hf_config)
    state = checkpoint.consolidated_state_dict(ckpt, cfg.zero.stage)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "decoder" not in k]:  # tied decoder weights may be absent
        raise ValueError(
            f"checkpoint {ckpt} does not match its config.yaml: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tokenizer = load_tokenizer(Path(cfg.data.dataset_dir, manifest["tokenizer"]["dir"]))
    models.save_hf(model, model.state_dict(), tokenizer, out_dir)
    step = checkpoint.read_state(ckpt)["step"]
    log.info("exported %s (step %d) to %s", ckpt, step, out_dir)
    return {"metrics": {"step": step}, "artifacts": {"hf_model": str(Path(out_dir).resolve()), "checkpoint": str(ckpt)}}


def predict(
    model_dir: str | Path,
    input_file: str | Path,
    out_file: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
) -> dict:
    """``ptft predict``: apply a finetuned adapter (or full model) to a file, in this process.
    Writes a CSV with the text(s), the predicted label and its probability. ``max_length``
    (tokens): by default the length the model was finetuned with (128 for a model that does not
    record it)."""
    import csv

    import torch

    from .adapters import classifier_meta, load_classifier
    from .data.build import DataError
    from .data.labeled import iter_rows

    if max_length is not None and max_length < 1:
        raise DataError(f"--max-length must be a positive number of tokens, got {max_length}")
    model, tokenizer, names = load_classifier(model_dir)
    max_length = max_length or classifier_meta(model_dir).get("max_length") or 128
    log.info("predict: texts truncated to %d tokens", max_length)
    texts, pairs, ids = [], [], []
    for where, row in iter_rows(input_file):  # a file, or a mongodb:// collection
        for column in (text_column,) + ((text_pair_column,) if text_pair_column else ()):
            if not isinstance(row, dict) or row.get(column) is None:
                raise DataError(f"{where}: no column {column!r}; set --text-column / --text-pair-column")
        texts.append(str(row[text_column]))
        pairs.append(str(row[text_pair_column]) if text_pair_column else None)
        ids.append(row.get("_id", len(ids)))  # a collection's _id, else the example's index
    results = []
    with torch.no_grad():
        for lo in range(0, len(texts), batch_size):
            t, p = texts[lo : lo + batch_size], pairs[lo : lo + batch_size] if text_pair_column else None
            enc = tokenizer(t, p, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            probs = model(
                **{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            ).logits.softmax(-1)
            best = probs.max(-1)
            results += [(names[best.indices[i]], round(float(best.values[i]), 4)) for i in range(len(t))]
    from .data import files, mongo

    if mongo.is_mongo(files.location(out_file)):  # one document per input, with the input's _id
        loc = files.location(out_file)
        mongo.write_documents(
            loc,
            [
                {"_id": i, "text": t}
                | ({"text_pair": p} if text_pair_column else {})
                | {"prediction": y, "probability": q}
                for i, t, p, (y, q) in zip(ids, texts, pairs, results)
            ],
        )
        return {"metrics": {"num_examples": len(texts)}, "artifacts": {"predictions": mongo.public_uri(loc)}}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"] + (["text_pair"] if text_pair_column else []) + ["prediction", "probability"])
        for t, p, (y, q) in zip(texts, pairs, results):
            writer.writerow([t] + ([p] if text_pair_column else []) + [y, f"{q:.4f}"])
    return {"metrics": {"num_examples": len(texts)}, "artifacts": {"predictions": str(out.resolve())}}


def with_task_text(cfg: PipelineConfig, jobs_: list[FinetuneConfig], out_dir: str | Path) -> tuple[Any, list[dict]]:
    """The data build of a pipeline with ``pretrain_on_task_text``: each finetune job's training
    texts (:func:`classify.training_texts`: the split the job trains on, never its validation or
    test examples) written to ``<out_dir>/<job>.jsonl`` under ``data.text_field`` and added to
    ``data.inputs`` with ``task_text_weight`` (alone with ``task_text_only``). Jobs whose training
    texts are the same share one file. Returns the build config and the manifest's ``task_text``
    entries (``input``, ``jobs``, ``task``, ``num_examples``). ``jobs_`` are resolved (absolute
    task files)."""
    from .classify import training_texts
    from .data import mongo
    from .data.build import default_corpus

    data = cfg.data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    seen: dict[tuple, dict] = {}
    for job in jobs_:
        texts = training_texts(job, cfg.task_text_examples)
        key = tuple(texts)
        if key in seen:  # the same training texts (one task, two methods): added once
            seen[key]["jobs"].append(job.name)
            continue
        path = out / f"{job.name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({data.text_field: t}, ensure_ascii=False) + "\n" for t in texts)
        seen[key] = entry = {
            "input": str(path),
            "jobs": [job.name],
            "task": mongo.public_uri(str(job.task.train_file)),
            "examples": cfg.task_text_examples,
            "num_texts": len(texts),
        }
        entries.append(entry)
        log.info(
            "task text: %d training texts of finetune job %s (%s) added to the corpus with weight %g",
            len(texts),
            job.name,
            entry["task"],
            cfg.task_text_weight,
        )
    if cfg.task_text_only:
        inputs, weights = [], []
    else:
        inputs = list(data.inputs) or default_corpus()
        weights = list(data.input_weights) or [1.0] * len(inputs)
    inputs += [e["input"] for e in entries]
    weights += [cfg.task_text_weight] * len(entries)
    return dataclasses.replace(data, inputs=inputs, input_weights=weights), entries


def _continued_tokenizer(data: DataBuildConfig, pre: PretrainConfig) -> DataBuildConfig:
    """A pipeline that continues pretraining from ``pretrain.model.init_from`` builds its data
    with that model's tokenizer (token ids must mean the words the model learned), unless
    ``data.tokenizer.path`` names one (preflight checks it is the same)."""
    if not pre.model.init_from or data.tokenizer.path:
        return data
    log.info("continued pretraining: the data is tokenized with the tokenizer of %s", pre.model.init_from)
    return dataclasses.replace(data, tokenizer=dataclasses.replace(data.tokenizer, path=_abs(pre.model.init_from)))


def pipeline(cfg: PipelineConfig, *, address: str | None = None) -> dict:
    """``ptft pipeline``: data build -> pretrain -> the finetune jobs, in one Ray session.

    The finetune jobs are submitted together: those whose workers fit on the cluster run
    concurrently, the others wait for resources (Ray Train queues them). A job that fails is
    reported in the table; the others go on.
    """
    from . import launcher

    root = Path(_abs(cfg.run_dir))
    data_dir = root / "data"
    export_dir = root / "pretrain" / "export"
    group = cfg.pretrain.tracking.group or root.name  # one W&B group: finetuning shown with its pretraining
    pre = dataclasses.replace(
        cfg.pretrain,
        run_dir=str(root / "pretrain"),
        data=dataclasses.replace(cfg.pretrain.data, dataset_dir=str(data_dir)),
        tracking=dataclasses.replace(cfg.pretrain.tracking, group=group),
    )
    fins = [
        dataclasses.replace(
            job,
            run_dir=str(root / "finetune" / job.name),
            base_model=str(export_dir),
            tracking=dataclasses.replace(job.tracking, group=job.tracking.group or group),
        )
        for job in cfg.finetune
    ]
    cfg = dataclasses.replace(cfg, run_dir=str(root), pretrain=pre, finetune=fins)
    prepare_run_dir(root, cfg)
    # Check the labeled data before spending minutes on pretraining.
    fins = [_resolve_finetune(job, check_model=False) for job in fins]
    with launcher.session(address, use_gpu=pre.scaling.use_gpu or any(j.scaling.use_gpu for j in fins)):
        for job in fins:
            launcher.check_resources(job.scaling, f"finetune[{job.name}]")
        log.info("[1/3] building the dataset in %s", data_dir)
        data_cfg, task_text = _continued_tokenizer(cfg.data, pre), None
        if cfg.pretrain_on_task_text:
            data_cfg, task_text = with_task_text(dataclasses.replace(cfg, data=data_cfg), fins, root / "task_text")
        data_summary = build_data(
            dataclasses.replace(data_cfg, output_dir=str(data_dir)), root / "data_build", task_text=task_text
        )
        log.info("[2/3] pretraining")
        pre_summary = pretrain(pre)
        log.info("[3/3] finetuning: %d job(s)", len(fins))
        results = run_finetune_jobs(fins)
    table = [
        {"job": name, **{k: r["metrics"].get(k) for k in JOB_COLUMNS}, "error": r.get("error")}
        for name, r in results.items()
    ]
    summary = {
        "metrics": {
            "data": data_summary["metrics"],
            "pretrain": pre_summary["metrics"],
            "finetune": {name: r["metrics"] for name, r in results.items()},
            "jobs": table,
        },
        "artifacts": {
            **data_summary["artifacts"],
            **pre_summary["artifacts"],
            "finetune": {name: r.get("artifacts", {}) for name, r in results.items()},
        },
    }
    from .tracking import write_summary

    write_summary(root, summary["metrics"], summary["artifacts"])
    _write_table(root / "jobs.csv", table)
    return summary


JOB_COLUMNS = (
    "status",
    "test_accuracy",
    "test_macro_f1",
    "trainable_params",
    "steps",
    "train_time_s",
    "started_at",
    "finished_at",
)


def run_finetune_jobs(jobs_: list[FinetuneConfig]) -> dict[str, dict]:
    """Run finetune jobs at once on the joined Ray cluster (one driver thread each: Ray Train
    schedules their workers and queues what does not fit); returns name -> summary, with
    ``status`` ``ok`` or ``failed`` and the error line of a failed job."""
    from concurrent.futures import ThreadPoolExecutor

    from . import launcher

    def one(job: FinetuneConfig) -> dict:
        started = time.time()
        try:
            job = _with_max_length(job)  # the base model exists now: pretraining made it
            prepare_run_dir(job.run_dir, job)
            launcher.fit("finetune", job, name="finetune")
            out = _read_summary(job.run_dir, f"finetune job {job.name}")
            out["metrics"].update(status="ok", started_at=started, finished_at=time.time())
            return out
        except Exception as e:  # one job failing must not stop the others
            log.error("finetune job %s failed: %s", job.name, e)
            return {"metrics": {"status": "failed", "started_at": started, "finished_at": time.time()}, "error": str(e)}

    with ThreadPoolExecutor(max_workers=len(jobs_)) as pool:
        futures = {job.name: pool.submit(one, job) for job in jobs_}
        return {name: f.result() for name, f in futures.items()}


def _write_table(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["job", *JOB_COLUMNS, "error"])
        writer.writeheader()
        writer.writerows(rows)
