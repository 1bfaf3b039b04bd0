"""Every driver-side check a command runs before Ray starts, and what ``--dry-run`` prints.

Owns: the checks of the files a config names (input globs match and their first record
reads, the dataset's manifest and tokenizer hash, the model fitting the data's vocabulary
and sequence length, task files with their columns and at least two labels, a base model
with weights and a tokenizer that belong together) and the run length said as steps =
epochs = tokens. Each check is a plain function that raises :class:`DataError` or
:class:`ConfigError` naming the file, field or value; :func:`preflight` runs the ones a
command needs and returns the config with its run length in steps.

No torch, ray or transformers import: the checks take milliseconds (a task file is read once).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .data.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "modernbert")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class Checked:
    """What :func:`preflight` found: the config to run (run length in steps) and the lines
    ``--dry-run`` prints about it."""

    cfg: Any
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data build


def check_inputs(data: C.DataBuildConfig) -> list:
    """The input sources of a data build: every glob matches, every file has a known format
    and its first record reads (a JSONL/CSV/Parquet file has ``data.text_field``)."""
    from .data.build import default_corpus
    from .data.ingest import iter_source_documents, resolve_sources

    on_error = getattr(data, "on_error", "raise")
    sources = resolve_sources(
        data.inputs or default_corpus(),
        data.input_weights,
        on_error=on_error,
        mongo=getattr(data, "mongo", None),
        text_field=data.text_field,
    )
    if not any(s.files or getattr(s, "collection", None) is not None for s in sources):
        raise DataError(
            f"data.inputs: nothing usable in {', '.join(map(repr, data.inputs))}: every file was left out "
            "(data.on_error=skip)"
        )
    for source in sources:
        for path in source.files:
            if not isinstance(path, Path):  # a tar shard at a URL: its records are read by the build
                continue
            docs = iter_source_documents(
                source, path, text_field=data.text_field, min_chars=data.min_doc_chars, on_error=on_error
            )
            try:
                next(docs, None)
            except UnicodeDecodeError as e:
                raise DataError(f"input file {path}: not text ({e.reason} at byte {e.start})") from None
            finally:
                docs.close()
    if data.tokenizer.path:
        check_tokenizer_dir(data.tokenizer.path, "data.tokenizer.path")
    return sources


def check_output_dir(data: C.DataBuildConfig, run_dir: str) -> Path:
    """The dataset's directory must not hold a dataset already (nothing is overwritten)."""
    out = Path(data.output_dir or Path(run_dir, "data"))
    if (out / "manifest.json").exists():
        raise DataError(
            f"{out} already holds a dataset (manifest.json); choose another data.output_dir / --run-dir or remove it"
        )
    return out


def check_tokenizer_dir(path: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what}: tokenizer directory {folder} does not exist")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(
            f"{what}: {folder} is not a Hugging Face tokenizer directory (no {' or '.join(TOKENIZER_FILES)})"
        )
    return folder


# --------------------------------------------------------------------------- pretraining data


def check_dataset(
    dataset_dir: str | None, model: C.ModelConfig, what: str = "data.dataset_dir", on_error: str = "raise"
) -> dict:
    """The dataset a pretraining run reads: its manifest, its shard files (missing or short
    ones are left to the stream when ``on_error`` is ``skip``), the tokenizer hash, and a model
    that fits its vocabulary and sequence length. Returns the manifest."""
    from .data import files
    from .data.build import check_tokenizer, read_manifest
    from .data.shards import size_problem

    if not dataset_dir:
        raise DataError(f"{what} is not set: build a dataset with `ptft data build` and point {what} at it")
    if not files.is_remote(files.location(dataset_dir)) and not Path(dataset_dir).is_dir():
        raise DataError(f"{what}: dataset directory {dataset_dir} does not exist")
    manifest = read_manifest(dataset_dir)
    if not files.is_remote(files.location(dataset_dir)) and on_error == "raise":
        for split in ("train", "valid"):
            for shard in manifest["splits"][split]["shards"]:
                path = Path(dataset_dir, shard["file"])
                problem = size_problem(str(path), shard, path.stat().st_size if path.is_file() else None)
                if problem:
                    raise DataError(f"{what}: {problem}")
    init_from = model.init_from
    if init_from:
        check_tokenizer(dataset_dir, init_from, what="model.init_from", manifest=manifest)  # the first to say
        init = check_model_dir(init_from, "model.init_from", need_tokenizer=False)
        vocab, positions = init["vocab_size"], init.get("max_position_embeddings")
        where = f"model.init_from ({init_from})"
    else:
        vocab, positions, where = manifest["vocab_size"], model.max_position_embeddings, "model.max_position_embeddings"
        check_tokenizer(dataset_dir, dataset_dir)  # the manifest's hash of its own tokenizer
    if vocab is not None and vocab < manifest["vocab_size"]:
        raise DataError(
            f"{where} has vocab_size {vocab}, fewer than the {manifest['vocab_size']} tokens of the tokenizer of "
            f"{dataset_dir}"
        )
    if positions is not None and manifest["seq_len"] > positions:
        raise DataError(
            f"{dataset_dir} holds samples of seq_len {manifest['seq_len']} > {where} max_position_embeddings "
            f"{positions}; rebuild the data with a smaller data.seq_len or raise model.max_position_embeddings"
        )
    return manifest


def check_continued_tokenizer(init_from: str, tokenizer_path: str | None) -> str:
    """A pipeline continuing from ``init_from`` tokenizes its data with that model's tokenizer:
    ``data.tokenizer.path``, when given, must be the same tokenizer (same tokenizer.json hash).
    Returns the note for ``--dry-run``."""
    from .data.build import tokenizer_sha256

    model_tok = Path(init_from).expanduser()
    if not (model_tok / "tokenizer.json").is_file():
        raise DataError(
            f"pretrain.model.init_from: {init_from} has no tokenizer.json; continued pretraining tokenizes the new "
            "text with the model's own tokenizer: use a `ptft pretrain` export (its export/ holds one)"
        )
    if tokenizer_path:
        given, expected = tokenizer_sha256(Path(tokenizer_path).expanduser()), tokenizer_sha256(model_tok)
        if given != expected:
            raise DataError(
                f"data.tokenizer.path={tokenizer_path} (sha256 {given[:12]}...) is not the tokenizer of "
                f"pretrain.model.init_from={init_from} (sha256 {expected[:12]}...): continued pretraining needs the "
                f"model's own tokenizer; drop data.tokenizer.path (the pipeline then uses {init_from}'s)"
            )
    return f"continued pretraining from {init_from}: the data is tokenized with its tokenizer"


# --------------------------------------------------------------------------- models


def _config_json(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise DataError(f"{what}: {folder} has no config.json; it is not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{what}: {path} cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{what}: {path} must hold a JSON object")
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise DataError(
            f"{what}: {path} has model_type {cfg.get('model_type')!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return cfg


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header (no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if not 2 <= size <= 100_000_000:
                raise ValueError(f"header size {size}")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: v.get("shape", []) for k, v in header.items() if isinstance(v, dict)}


def _tokenizer_size(folder: Path) -> int | None:
    """Tokens of a fast tokenizer (tokenizer.json), added tokens included; None without one."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the Rust library's parse errors have no common Python type
        raise DataError(f"{path}: not a readable tokenizer ({str(e)[:200]})") from None


def check_model_dir(path: str, what: str, *, need_tokenizer: bool = True) -> dict:
    """A Hugging Face model directory: a supported config.json, weights whose embedding
    matches it, and (``need_tokenizer``) a tokenizer no larger than the model's vocabulary.
    Returns config.json's content."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what}: {folder} does not exist (or is not a directory)")
    cfg = _config_json(folder, what)
    weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not weights:
        raise DataError(f"{what}: {folder} has no weights ({' / '.join(WEIGHT_FILES)})")
    if weights[0].name == "model.safetensors":
        for name, shape in _safetensors_shapes(weights[0]).items():
            if name.endswith(("word_embeddings.weight", "tok_embeddings.weight")) and len(shape) == 2:
                expected = [cfg.get("vocab_size"), cfg.get("hidden_size")]
                if shape != expected:
                    raise DataError(
                        f"{what}: {weights[0]} holds {name} of shape {shape} but config.json says vocab_size x "
                        f"hidden_size = {expected}: the weights are not this config's"
                    )
    has_tokenizer = any((folder / f).is_file() for f in TOKENIZER_FILES)
    if need_tokenizer and not has_tokenizer:
        raise DataError(f"{what}: {folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    size = _tokenizer_size(folder)
    if size is not None and isinstance(cfg.get("vocab_size"), int) and size > cfg["vocab_size"]:
        raise DataError(
            f"{what}: the tokenizer in {folder} has {size} tokens but the model's vocab_size is {cfg['vocab_size']}: "
            "the tokenizer is not the model's"
        )
    return cfg


def check_base_model(cfg: C.FinetuneConfig, what: str = "base_model") -> dict:
    """The model a finetune job starts from: set, with weights and a tokenizer that belong
    together, of a family whose classifier can pool as ``pooling`` says."""
    if not cfg.base_model:
        raise DataError(f"{what} is not set: point it at an HF model directory (e.g. a pretraining run's export/)")
    hf = check_model_dir(cfg.base_model, what)
    if cfg.pooling != "cls" and hf["model_type"] != "modernbert":
        raise DataError(
            f"pooling: {cfg.pooling!r} needs a ModernBERT model; {what} {cfg.base_model} is a {hf['model_type']} "
            "model, whose classifier reads the first token (use pooling: cls)"
        )
    return hf


# --------------------------------------------------------------------------- task files


@dataclass
class TaskCheck:
    """Label counts of a task's files, and of the training split the recipe will train on."""

    labels: list[str]
    train_file_counts: dict[str, int]
    train_counts: dict[str, int]
    num_validation: int
    num_test: int

    @property
    def num_train(self) -> int:
        return sum(self.train_counts.values())


def _held_out(counts: dict[str, int], fraction: float) -> tuple[dict[str, int], int]:
    """Per class, what a stratified split by ``fraction`` keeps, and how many it holds out
    (the recipe's ``stratified_split`` rounds each class the same way)."""
    held = {c: int(round(n * fraction)) for c, n in counts.items()}
    return {c: counts[c] - held[c] for c in counts}, sum(held.values())


def check_task(cfg: C.FinetuneConfig, where: str = "task") -> TaskCheck:
    """Task files exist, have the named columns, the training file at least two labels, the
    other files no label the training file lacks; counts the examples per class."""
    from .data import mongo
    from .data.labeled import check_known_labels, check_two_labels, label_order, materialize_trec, read_examples

    task = cfg.task
    with tempfile.TemporaryDirectory(prefix="ptft-preflight-") as tmp:
        if task.train_file is None:  # the built-in TREC-6
            train, test = materialize_trec(tmp)
            task = dataclasses.replace(
                task, train_file=str(train), test_file=str(test), text_column="text", label_column="label"
            )

        def read(name: str) -> list[str]:
            value = getattr(task, name)
            path = value if mongo.is_mongo(value) else Path(value).expanduser()  # a collection, or a file
            if isinstance(path, Path) and not path.is_file():
                raise DataError(f"{where}.{name}: task file {path} does not exist")
            return read_examples(path, task.text_column, task.label_column, task.text_pair_column, task.mongo)[1]

        train_labels = read("train_file")
        check_two_labels(task.train_file, task.label_column, train_labels, where=f"{where}.train_file: ")
        counts = dict(collections.Counter(train_labels))
        other = {}
        for name in ("validation_file", "test_file"):
            if getattr(task, name):
                labels = read(name)
                check_known_labels(
                    getattr(task, name), task.label_column, labels, counts, task.train_file, where=f"{where}.{name}: "
                )
                other[name] = len(labels)
    train = dict(counts)
    num_test = other.get("test_file", 0)
    if not task.test_file:
        train, num_test = _held_out(train, task.test_fraction)
    num_validation = other.get("validation_file", 0)
    if not task.validation_file and task.validation_fraction > 0 and cfg.eval_every_steps > 0:
        train, num_validation = _held_out(train, task.validation_fraction)
    total = sum(train.values())
    if task.train_examples is not None and task.train_examples < total:
        share = task.train_examples / total
        train = {c: int(round(n * share)) for c, n in train.items()}
    names = label_order(list(counts))
    return TaskCheck(names, {n: counts[n] for n in names}, {n: train[n] for n in names}, num_validation, num_test)


# --------------------------------------------------------------------------- run length


def with_steps(cfg: Any, steps: int) -> Any:
    """``cfg`` with its run length said in steps (``optim.max_epochs`` / ``max_tokens`` cleared)."""
    optim = dataclasses.replace(cfg.optim, max_steps=steps, max_epochs=None, max_tokens=None)
    return dataclasses.replace(cfg, optim=optim)


def _length_note(name: str, optim: C.OptimConfig, length: C.RunLength, of: str) -> str:
    given = next(f"optim.{n}={getattr(optim, n)!r}" for n in C.RUN_LENGTH_FIELDS if getattr(optim, n) is not None)
    return f"{name}: run length ({given}): {length} of {of}"


def _pretrain_notes(name: str, cfg: C.PretrainConfig, manifest: dict) -> tuple[Any, list[str]]:
    num = manifest["splits"]["train"]["num_samples"]
    seq_len = manifest["seq_len"]
    length = C.run_length(cfg.optim, num, seq_len)
    notes = [
        f"{name}: dataset {cfg.data.dataset_dir}: {num:,} train samples of {seq_len} tokens "
        f"({C._si(num * seq_len)} tokens), vocabulary {manifest['vocab_size']:,}",
        _length_note(name, cfg.optim, length, "this dataset"),
    ]
    if cfg.time_budget_s:
        notes.append(f"{name}: or {cfg.time_budget_s:,.0f} s of training (time_budget_s), whichever ends first")
    return with_steps(cfg, length.steps), notes


def _finetune_notes(name: str, cfg: C.FinetuneConfig, task: TaskCheck) -> tuple[Any, list[str]]:
    if task.num_train < cfg.optim.global_batch_size:
        raise DataError(
            f"{name}: the training split holds {task.num_train} examples, fewer than one global batch of "
            f"{cfg.optim.global_batch_size} (optim.global_batch_size)"
        )
    length = dataclasses.replace(C.run_length(cfg.optim, task.num_train), unit="examples")
    per_class = ", ".join(f"{label} {n:,}" for label, n in task.train_counts.items())
    notes = [
        f"{name}: {len(task.labels)} labels; {task.num_train:,} train / {task.num_validation:,} validation / "
        f"{task.num_test:,} test examples",
        f"{name}: training examples per class: {per_class}",
        _length_note(name, cfg.optim, length, "the training split"),
    ]
    return with_steps(cfg, length.steps), notes


# --------------------------------------------------------------------------- per command


def _every(*checks) -> list:
    """Run independent checks; when several fail, one error says every problem."""
    results, errors = [], []
    for check in checks:
        try:
            results.append(check())
        except (DataError, C.ConfigError) as e:
            errors.append(e)
            results.append(None)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        text = "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
        kind = C.ConfigError if all(isinstance(e, C.ConfigError) for e in errors) else DataError
        raise kind(f"{len(errors)} problems: {text}")
    return results


def preflight(command: str, cfg: Any) -> Checked:
    """Run every check ``command`` needs before Ray starts; returns the config to run (run
    length in steps) and the notes ``--dry-run`` prints.

    Raises:
        DataError: a file the config names is missing or malformed (named).
        ConfigError: a field whose value cannot work with the files (named).
    """
    if command == "data":
        sources = check_inputs(cfg.data)
        out = check_output_dir(cfg.data, cfg.run_dir)
        size = sum(s.num_bytes for s in sources)
        files = sum(len(s.files) for s in sources)
        return Checked(cfg, [f"data build: {files} input file(s), {size / 1e6:,.1f} MB, into {out}"])
    if command == "pretrain":
        manifest = check_dataset(cfg.data.dataset_dir, cfg.model, on_error=cfg.data.on_error)
        run, notes = _pretrain_notes("pretrain", cfg, manifest)
        return Checked(run, notes)
    if command == "finetune":
        task, _ = _every(lambda: check_task(cfg), lambda: check_base_model(cfg))
        run, notes = _finetune_notes("finetune" if cfg.name == "finetune" else f"finetune {cfg.name}", cfg, task)
        return Checked(run, notes)
    if command == "pipeline":
        sources = check_inputs(cfg.data)
        size = sum(s.num_bytes for s in sources)
        notes = [f"data build: {sum(len(s.files) for s in sources)} input file(s), {size / 1e6:,.1f} MB"]
        optim = cfg.pretrain.optim
        if optim.max_steps is None:
            given = "max_epochs" if optim.max_epochs is not None else "max_tokens"
            raise C.ConfigError(
                f"pretrain.optim.{given}: in a pipeline the dataset is built first, so its size is not known before "
                "Ray starts; size pretraining with pretrain.optim.max_steps (or run `ptft data build` and `ptft "
                "pretrain` apart)"
            )
        tokens = optim.max_steps * optim.global_batch_size * cfg.data.seq_len
        notes.append(
            f"pretrain: run length: {optim.max_steps:,} steps x {optim.global_batch_size} samples of "
            f"{cfg.data.seq_len} tokens = {C._si(tokens)} tokens (epochs: known once the data is built)"
        )
        family = cfg.pretrain.model.family
        init_from = cfg.pretrain.model.init_from
        if init_from:
            family = check_model_dir(init_from, "pretrain.model.init_from", need_tokenizer=False)["model_type"]
            notes.append(check_continued_tokenizer(init_from, cfg.data.tokenizer.path))
        for i, job in enumerate(cfg.finetune):
            if job.pooling != "cls" and family != "modernbert":
                raise C.ConfigError(
                    f"finetune[{i}].pooling: {job.pooling!r} needs a ModernBERT model; the pipeline pretrains a "
                    f"{family} model (use pooling: cls)"
                )
        jobs, tasks = [], []
        for i, job in enumerate(cfg.finetune):
            tasks.append(check_task(job, f"finetune[{i}].task"))
            run, more = _finetune_notes(f"finetune {job.name}", job, tasks[-1])
            jobs.append(run)
            notes += more
        if cfg.pretrain_on_task_text:
            if cfg.task_text_examples == "trained":
                what = ", ".join(f"{t.num_train:,} of job {j.name}" for j, t in zip(cfg.finetune, tasks))
                what = f"the training texts ({what})"
            else:
                what = f"the whole training splits of jobs {', '.join(j.name for j in cfg.finetune)}"
            notes.append(
                f"task text: {what} join the corpus with weight {cfg.task_text_weight:g}"
                + (", as its only text (task_text_only)" if cfg.task_text_only else "")
                + "; never a validation or test text"
            )
        return Checked(dataclasses.replace(cfg, finetune=jobs), notes)
    raise ValueError(f"no preflight for command {command!r}")
