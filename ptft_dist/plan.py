"""Predict before you pay: memory per rank, the largest micro batch that fits, communication
per step, step time, tokens/s, run time, GPU-hours and cost of a pretrain or finetune config on
a target (GPUs of a known kind, or CPU ranks), for every ZeRO stage and offload choice.

Owns: the device table, the parameter count of each model family, the bytes per parameter of
each ZeRO stage, the activation bytes of a micro batch, the communication volume of each stage,
and the time model. Pure arithmetic: no torch at import (and none at all), so `ptft plan` and
`--dry-run` answer in milliseconds. `benchmarks/plan_vs_measured.py` measures the same terms
(live tensors per rank, step time) on CPU and docs/scaling.md quotes the tables.

Every term, per rank, with N data-parallel ranks and P parameters (T of them trainable):

- model states: the bytes per parameter of DeepSpeed's ZeRO as measured (docs/performance.md,
  "ZeRO memory per rank"), bf16: 16 / 2 + 14/N (stages 1 and 2 alike) / 16/N at the peak;
  fp32 (CPU): 16 / 4 + 16/N / 20/N; after the optimizer step the gradients are gone.
- activations: the tensors autograd keeps at the end of the forward of the transformers
  implementation with SDPA attention (no sequence^2 term), counted per token and layer
  (:data:`ACTIVATION_PER_TOKEN`), plus the masked-only MLM head per masked token.
- peak: the larger of (states at the end of the forward + activations) and (states with
  gradients); under stage 3 the forward's gathered weights are still held at its end.
- communication: ring collectives, bytes each rank sends per optimizer step.
- time: FLOPs (``6 x non-embedding parameters`` + attention + head, as
  ``ptft_dist.models.flops_per_token``) / (peak x MFU) + the exposed communication + the
  optimizer step (memory-bound: parameters updated on the rank / the device's update rate); on
  CPU, stage 3's host work too (:func:`zero3_host_s`: modules, tensors and buckets x measured costs).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import ConfigError, FinetuneConfig, PretrainConfig

GIB = 2**30


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU rank) as the planner sees it."""

    name: str
    peak_tflops: float  # dense bf16 (V100: fp16) tensor-core peak; CPU: achieved fp32 TFLOP/s per rank
    memory_gib: float  # per device; CPU: None-equivalent filled in from the host
    intra_node_gbs: float  # GB/s per rank, one direction, achievable bus bandwidth inside a node
    inter_node_gbs: float  # GB/s per rank across nodes (NIC bandwidth per GPU, achievable)
    pcie_gbs: float  # host <-> device GB/s (offload traffic)
    default_mfu: float  # used when no measured figure exists
    latency_s: float  # per collective
    gpus_per_node: int
    host_memory_gib: float  # per node, for what offload keeps on the host
    source: str
    optimizer_params_per_s: float = 1e9  # AdamW updates per second per rank (memory-bound)
    # ZeRO-3's host work per micro batch (seconds, on top of its collectives): per module (DeepSpeed's
    # four hooks), per partitioned tensor (fetch, release, gradient hook), per persistent tensor and
    # per gradient bucket (flattening and splitting around the reduce-scatter). Measured on CPU only.
    zero3_module_s: float = 0.0
    zero3_param_s: float = 0.0
    zero3_persistent_s: float = 0.0
    zero3_bucket_s: float = 0.0

    @property
    def is_gpu(self) -> bool:
        return self.name != "CPU"


#: Device specs. Peaks are NVIDIA's datasheets (dense, without sparsity): H100 SXM5 and H200 SXM
#: 989.4 TFLOP/s bf16, A100 SXM 312, V100 SXM2 125 (fp16 tensor cores; V100 has no bf16).
#: Memory: H100 80 GB, H200 141 GB, A100 80 GB, V100 32 GB (the planner counts them as GiB-sized
#: usable minus a reserve, see :data:`RESERVE_GIB`). NVLink: H100/H200 900 GB/s, A100 600 GB/s,
#: V100 300 GB/s bidirectional; the table keeps 80% of one direction (what nccl-tests' bus
#: bandwidth reaches). Across nodes: one NIC per GPU, 400 Gb/s NDR (H100/H200), 200 Gb/s HDR
#: (A100), and for V100 the DGX-2 of DeepSpeed's BERT record, 8 x 100 Gb/s for 16 GPUs; 90% of it.
#: PCIe: Gen5 x16 (H100/H200) 64 GB/s, Gen4 32, Gen3 16, at 80%. Default MFU: see docs/scaling.md
#: (between ModernBERT-base's ~27% on H100 and DeepSpeed BERT's 52% of V100 peak). Host memory
#: per node: the DGX of each (DGX H100/H200 and DGX A100 2 TB, DGX-2 1.5 TB). The optimizer step
#: is memory-bound: about 32 bytes move per parameter (fp32 master, moments, gradient, bf16 copy),
#: at the HBM bandwidth (H100 3.35 TB/s, H200 4.8, A100 2.04, V100 0.9).
DEVICES: dict[str, Device] = {
    "H100": Device(
        "H100", 989.4, 80.0, 360.0, 45.0, 51.0, 0.35, 20e-6, 8, 2048.0, "NVIDIA H100 SXM5 datasheet", 3.35e12 / 32
    ),
    "H200": Device(
        "H200", 989.4, 141.0, 360.0, 45.0, 51.0, 0.35, 20e-6, 8, 2048.0, "NVIDIA H200 SXM datasheet", 4.8e12 / 32
    ),
    "A100": Device(
        "A100", 312.0, 80.0, 240.0, 22.5, 25.6, 0.45, 20e-6, 8, 2048.0, "NVIDIA A100 SXM4 80GB datasheet", 2.04e12 / 32
    ),
    "V100": Device(
        "V100", 125.0, 32.0, 120.0, 5.6, 12.8, 0.45, 25e-6, 16, 1536.0, "NVIDIA V100 SXM2 datasheet, DGX-2", 0.9e12 / 32
    ),
}

#: A CPU rank (one core per rank, fp32, gloo over loopback): the 2-core machine of
#: docs/performance.md as benchmarks/plan_vs_measured.py measured it in CPU seconds (53 GFLOP/s
#: per rank calibrated on one training step, gloo 1.44 GB/s per rank and 133 us per collective,
#: AdamW 2.7e8 parameters/s; ZeRO-3's host work: ZERO3_CPU_S, its micro-benchmark of 2026-12-01);
#: pass ``--cpu-gflops`` for another machine. Memory: the host's.
ZERO3_CPU_S = (1596e-6, 128e-6, 417e-6, 1340e-6)  # per module, partitioned tensor, persistent tensor, bucket
CPU = Device(
    "CPU",
    0.053,
    0.0,
    1.44,
    1.44,
    1e9,
    1.0,
    133e-6,
    1,
    0.0,
    "measured: benchmarks/plan_vs_measured.py",
    2.7e8,
    *ZERO3_CPU_S,
)

#: GiB per GPU the planner keeps free: CUDA context, cuBLAS/NCCL workspaces, allocator slack.
RESERVE_GIB = 2.5
#: Share of a node's host memory that offloaded states may take (the rest: the OS, data loaders, pinned buffers).
HOST_USABLE = 0.8
#: CPU Adam under optimizer offload: parameter updates per second per rank (DeepSpeed's CPUAdam).
CPU_ADAM_PARAMS_PER_S = 1.0e9


@dataclass(frozen=True)
class Target:
    """Where the run goes: ``num_nodes`` x ``ranks_per_node`` ranks of one device kind."""

    device: Device
    num_nodes: int
    ranks_per_node: int
    memory_gib: float  # per rank

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.ranks_per_node

    def describe(self) -> str:
        kind = f"{self.device.name} ({self.memory_gib:.0f} GiB)" if self.device.is_gpu else "CPU ranks"
        return f"{self.world_size} x {kind} = {self.num_nodes} node(s) x {self.ranks_per_node}"


def parse_target(
    gpus: str | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    cpus: int | None = None,
    cpu_gflops: float | None = None,
    memory_gib: float | None = None,
) -> Target:
    """``--gpus 8xH100`` (or ``--gpus H100 --nodes 4 --gpus-per-node 8``), or ``--cpus 2``."""
    if gpus and cpus:
        raise ConfigError("give --gpus or --cpus, not both")
    if cpus is not None:
        if cpus < 1:
            raise ConfigError(f"--cpus must be >= 1, got {cpus}")
        per_node = gpus_per_node or cpus
        n_nodes = nodes or max(1, math.ceil(cpus / per_node))
        dev = replace(CPU, peak_tflops=cpu_gflops / 1e3) if cpu_gflops else CPU
        host = memory_gib or _host_memory_gib() / per_node
        return Target(dev, n_nodes, per_node, host)
    spec = (gpus or "").strip()
    if not spec:
        raise ConfigError("give a target: --gpus 8xH100 (or --gpus H100 --nodes 4 --gpus-per-node 8), or --cpus 2")
    count_text, sep, kind = spec.partition("x") if "x" in spec.lower() else ("", "", spec)
    if not sep and "X" in spec:
        count_text, sep, kind = spec.partition("X")
    kind = kind.strip().upper()
    if kind not in DEVICES:
        raise ConfigError(f"--gpus {gpus!r}: unknown GPU kind {kind!r}; known: {', '.join(DEVICES)} (e.g. 8xH100)")
    dev = DEVICES[kind]
    count = None
    if count_text:
        try:
            count = int(count_text)
        except ValueError:
            raise ConfigError(f"--gpus {gpus!r}: the count before 'x' must be an integer") from None
        if count < 1:
            raise ConfigError(f"--gpus {gpus!r}: the count must be >= 1")
    per_node = gpus_per_node or (min(count, dev.gpus_per_node) if count else dev.gpus_per_node)
    if count is None:
        count = (nodes or 1) * per_node
    n_nodes = nodes or math.ceil(count / per_node)
    if n_nodes * per_node != count:
        raise ConfigError(f"--gpus {gpus!r}: {count} GPUs do not fill {n_nodes} node(s) x {per_node} per node")
    return Target(dev, n_nodes, per_node, memory_gib or dev.memory_gib)


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return 16.0


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    """The numbers of an encoder that the plan needs."""

    family: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    dropout: float

    def describe(self) -> str:
        return (
            f"{self.family} L={self.layers} H={self.hidden} A={self.heads} FFN {self.intermediate}, vocab {self.vocab}"
        )


def num_params(s: Shape) -> int:
    """Parameters of the masked LM as ``ptft_dist.models.build_mlm`` builds it (the decoder weight
    is tied to the word embeddings; BERT's MLM model has no pooler)."""
    h, i, V, L = s.hidden, s.intermediate, s.vocab, s.layers
    if s.family in ("bert", "roberta"):
        positions = s.max_positions + (2 if s.family == "roberta" else 0)
        embeddings = V * h + positions * h + 2 * h + 2 * h  # words, positions, 2 token types, LayerNorm
        layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        head = h * h + h + 2 * h + V  # transform, LayerNorm, decoder bias
        return embeddings + L * layer + head
    if s.family == "modernbert":  # no biases, no norm biases; layer 0 has no attention norm
        layer = 3 * h * h + h * h + h + 2 * i * h + i * h + h
        return V * h + h + L * layer - h + h + (h * h + h) + V
    raise ConfigError(f"model.family {s.family!r} is not one the planner knows (bert, roberta, modernbert)")


def parameter_numels(s: Shape) -> list[int]:
    """The elements of each parameter tensor, in the order the model registers them (the order of the
    forward, but for the decoder bias and RoBERTa's positions; the decoder weight is the word
    embeddings'): what ZeRO-3 gathers, hooks and buckets one by one. Sums to :func:`num_params`."""
    h, i, V, L = s.hidden, s.intermediate, s.vocab, s.layers
    if s.family in ("bert", "roberta"):
        words, positions, rest = [V * h], [(s.max_positions + 2 * (s.family == "roberta")) * h], [2 * h, h, h]
        embeddings = words + (rest + positions if s.family == "roberta" else positions + rest)
        layer = [h * h, h] * 4 + [h, h] + [i * h, i, h * i, h] + [h, h]  # q, k, v, o; LayerNorm; FFN; LayerNorm
        return embeddings + layer * L + [V, h * h, h, h, h]  # decoder bias, head transform, LayerNorm
    if s.family == "modernbert":
        layers = []
        for n in range(L):  # layer 0 has no attention norm
            layers += ([] if n == 0 else [h]) + [3 * h * h, h * h, h, 2 * i * h, i * h]
        return [V * h, h] + layers + [h, h * h, h, V]  # final norm, head dense and norm, decoder bias
    raise ConfigError(f"model.family {s.family!r} is not one the planner knows (bert, roberta, modernbert)")


def num_modules(s: Shape) -> int:
    """``nn.Module`` objects of the masked LM as ``ptft_dist.models.build_mlm`` builds it: ZeRO-3 hooks every one.
    BERT: 18 per layer (attention, its 4 linears, LayerNorm, 2 dropouts, the FFN's 2 linears, activation, ...)
    and 18 outside (embeddings, head, the wrappers); RoBERTa 3 fewer outside; ModernBERT 12 per layer, 14 outside."""
    per_layer, outside = {"bert": (18, 18), "roberta": (18, 15), "modernbert": (12, 14)}[s.family]
    return per_layer * s.layers + outside


def non_embedding_flops_params(s: Shape) -> int:
    """The matmul parameters of one layer, times layers (what ``6 x N`` counts)."""
    glu = 2 if s.family == "modernbert" else 1
    return s.layers * (4 * s.hidden * s.hidden + (glu + 1) * s.hidden * s.intermediate)


def flops_per_token(s: Shape, seq_len: int, mask_fraction: float) -> float:
    """Training FLOPs per input token, the formula of ``ptft_dist.models.flops_per_token``."""
    return (
        6.0 * non_embedding_flops_params(s)
        + 12.0 * s.layers * s.hidden * seq_len
        + 6.0 * s.hidden * s.vocab * mask_fraction
    )


#: Elements autograd keeps per token and layer at the end of the forward, as (x hidden,
#: x intermediate), by family and whether dropout is on. Counted on the transformers 5 models
#: with SDPA attention (torch 2.13; no sequence^2 term: the fused kernel keeps the log-sum-exp
#: only), checked by benchmarks/plan_vs_measured.py. Dropout off keeps more: the attention
#: kernel then saves its inputs and output too.
ACTIVATION_PER_TOKEN = {
    ("bert", True): (5, 2),
    ("bert", False): (8, 2),
    ("roberta", True): (5, 2),
    ("roberta", False): (8, 2),
    ("modernbert", True): (5, 4),
    ("modernbert", False): (10, 4),
}
#: Outside the layers, per token, x hidden: embeddings (BERT), + the final norm (ModernBERT).
OUTSIDE_LAYERS_PER_TOKEN = {"bert": 1.0, "roberta": 1.0, "modernbert": 1.5}
#: The CPU RNG state that activation checkpointing keeps per layer (bytes); on GPU it is tiny.
RNG_STATE_BYTES = 5056


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro batch on one rank."""

    kept: float  # alive at the end of the forward
    recompute: float  # extra during the backward (one layer recomputed, checkpointing only)

    @property
    def peak(self) -> float:
        return self.kept + self.recompute


def activation_bytes(
    s: Shape, micro_batch: int, seq_len: int, mask_fraction: float, dtype_bytes: int, checkpointing: bool
) -> Activations:
    """What a micro batch keeps for its backward: per token and layer (:data:`ACTIVATION_PER_TOKEN`),
    outside the layers, and the MLM head at the masked positions (4 x hidden + the vocabulary
    logits per masked token). With checkpointing each layer keeps only its input, and during the
    backward one layer's activations exist again."""
    tokens = micro_batch * seq_len
    ch, ci = ACTIVATION_PER_TOKEN[(s.family, s.dropout > 0)]
    layer = tokens * (ch * s.hidden + ci * s.intermediate) * dtype_bytes
    outside = tokens * OUTSIDE_LAYERS_PER_TOKEN[s.family] * s.hidden * dtype_bytes
    head = tokens * mask_fraction * (4 * s.hidden + s.vocab) * dtype_bytes
    inputs = tokens * 8 * 2  # int64 input ids and labels
    if checkpointing:
        kept = s.layers * (tokens * s.hidden * dtype_bytes + RNG_STATE_BYTES) + outside + head + inputs
        return Activations(kept, layer)
    return Activations(s.layers * layer + outside + head + inputs, 0.0)


# --------------------------------------------------------------------------- ZeRO


@dataclass(frozen=True)
class States:
    """Bytes per rank of the model states (on the device) and of what offload keeps on the host."""

    params: float
    grads: float
    optimizer: float
    host: float
    gathered: float = 0.0  # stage 3: full weights held from the forward into the backward

    @property
    def with_grads(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def after_step(self) -> float:
        """After the optimizer step: stages 0-2 free their gradients, stage 3 keeps its partition."""
        return self.with_grads - self.grads * self._freed

    @property
    def forward_end(self) -> float:
        """At the end of the forward (activations not included)."""
        return self.after_step + self.gathered

    _freed: float = 1.0


def model_states(
    total: int,
    trainable: int,
    stage: int,
    n: int,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> States:
    """ZeRO model states per rank. Frozen parameters (finetuning) have only their weights.

    bf16 (the ZeRO paper's mixed precision): weights 2, gradients 2, fp32 master + Adam moments 12
    bytes per trainable parameter. fp32 (CPU): weights 4, gradients 4, Adam 8, plus the fp32
    master partition DeepSpeed keeps under ZeRO (4/N). Stage 1 partitions gradients as stage 2
    does: DeepSpeed reduces each gradient bucket into its owner's partition as it is made (measured:
    stage 1 = stage 2, docs/performance.md).
    """
    w = 2 if bf16 else 4
    if stage == 0:
        params, grads, opt = w * total, w * trainable, (12 if bf16 else 8) * trainable
        return States(params, grads, opt, 0.0)
    master_and_moments = 12 * trainable / n  # fp32 master (4) + Adam moments (8), partitioned
    if stage in (1, 2):
        params, grads = w * total, w * trainable / n
        opt = master_and_moments
        if offload_optimizer:  # DeepSpeed moves the gradient partition to the host too (fp32)
            return States(params, 0.0, 0.0, opt + 4 * trainable / n)
        return States(params, grads, opt, 0.0)
    # stage 3: everything partitioned; the gradient partition stays allocated after the step. The
    # full weights gathered for the forward stay until the backward frees them: DeepSpeed's
    # stage3_max_live_parameters and stage3_max_reuse_distance (both 1e9 by default) keep up to
    # 1e9 gathered elements (measured: a whole 5-70M-parameter model at the end of the forward).
    params, grads, opt = w * total / n, w * trainable / n, master_and_moments
    gathered = w * min(total, STAGE3_MAX_LIVE_PARAMETERS)
    host = 0.0
    if offload_optimizer:
        host, opt, grads = opt + 4 * trainable / n, 0.0, 0.0
    if offload_params:
        host, params = host + params, 0.0
    return States(params, grads, opt, host, gathered, _freed=0.0)


#: DeepSpeed's defaults for stage3_max_live_parameters (and stage3_max_reuse_distance).
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000


@dataclass(frozen=True)
class Zero3Work:
    """What ZeRO-3 does per micro batch beyond the arithmetic, counted as DeepSpeed 0.19 does it with
    the derived config (``stage3_param_persistence_threshold`` = 10 x hidden, ``reduce_bucket_size`` =
    hidden^2, ``stage3_prefetch_bucket_size`` = 0.9 x hidden^2 and the default 1e9 live parameters)."""

    modules: int  # every module's pre/post-forward and pre/post-backward hooks run once
    params: int  # parameter tensors: fetched and released, and a gradient hook each
    gathers: int  # forward all-gathers: one per partitioned tensor (each is larger than the prefetch bucket)
    buckets: int  # gradient reduce-scatters: the backward's tensors packed greedily into reduce buckets
    persistent: int  # tensors of at most the threshold: not partitioned, all-gathered once after each step
    regathered: float  # elements gathered again in the backward: those past the 1e9 live parameters


def zero3_work(numels: list[int], modules: int, persistence_threshold: int, bucket_elements: float) -> Zero3Work:
    """Count :class:`Zero3Work` from the parameter tensors (:func:`parameter_numels`). The buckets:
    DeepSpeed reduces the open bucket when the next gradient would overflow it, in the backward's
    order (the reverse of the registration order)."""
    buckets, filled = 0, 0
    for n in reversed(numels):
        if filled and filled + n > bucket_elements:
            buckets, filled = buckets + 1, 0
        filled += n
    partitioned = [n for n in numels if n > persistence_threshold]
    regathered = max(0.0, sum(numels) - STAGE3_MAX_LIVE_PARAMETERS)
    return Zero3Work(
        modules, len(numels), len(partitioned), buckets + bool(filled), len(numels) - len(partitioned), regathered
    )


def zero3_host_s(work: Zero3Work, device: Device, accum: int) -> float:
    """ZeRO-3's host work per optimizer step, without its collectives: per micro batch, the measured
    cost of each module's hooks, of each partitioned and persistent tensor and of each reduce bucket."""
    per_micro = work.modules * device.zero3_module_s + work.gathers * device.zero3_param_s
    per_micro += work.persistent * device.zero3_persistent_s + work.buckets * device.zero3_bucket_s
    return accum * per_micro


@dataclass(frozen=True)
class Comm:
    """Bytes each rank sends per optimizer step, and the number of collectives."""

    bytes: float
    collectives: float
    overlapped: bool  # DeepSpeed overlaps it with compute (stage 3's default)


def communication(
    trainable: int,
    total: int,
    stage: int,
    n: int,
    accum: int,
    dtype_bytes: int,
    reduce_scatter: bool,
    bucket_elements: float,
    work: Zero3Work | None = None,
) -> Comm:
    """Ring collectives: an all-reduce of S bytes sends 2 S (N-1)/N per rank, a reduce-scatter or
    all-gather S (N-1)/N.

    - stage 0 (and 1): all-reduce of the gradients once per optimizer step;
    - stages 1-2: every micro batch's gradients go to their owners (reduce-scatter, or an
      all-reduce of the bucket with ``zero.reduce_scatter=false``, the CPU default), and after the
      step the updated weights are all-gathered;
    - stage 3 (``work`` counts its collectives): per micro batch, the weights all-gathered in the
      forward, one collective per partitioned tensor, and again in the backward only past the 1e9
      live parameters (below that the forward's stay gathered, as the memory term has it); the
      gradients reduce-scattered per bucket; per step, the persistent tensors all-gathered and 2
      all-reduces (gradient norm, overflow). Overlapped with compute by DeepSpeed's default on GPUs.
    """
    if n == 1:
        return Comm(0.0, 0.0, False)
    ring = (n - 1) / n
    g = trainable * dtype_bytes
    buckets = max(1.0, math.ceil(trainable / max(bucket_elements, 1.0)))
    if stage == 0:
        return Comm(2 * g * ring, buckets, False)
    if stage in (1, 2):
        per_micro = (1 if reduce_scatter else 2) * g * ring
        return Comm(accum * per_micro + total * dtype_bytes * ring, accum * buckets + 1, False)
    if work is None:
        raise ValueError("stage 3 needs its Zero3Work")
    per_micro = (total + work.regathered) * dtype_bytes + g
    collectives = accum * (work.gathers * (1 + (work.regathered > 0)) + work.buckets) + work.persistent + 2
    return Comm(accum * per_micro * ring, collectives, True)


# --------------------------------------------------------------------------- the plan


@dataclass
class Row:
    """One ZeRO stage and offload choice at the configured micro batch."""

    stage: int
    offload: str  # "", "optimizer", "optimizer+params"
    states: States
    activations: Activations
    act_per_sample: float
    peak_bytes: float
    max_micro_batch: int
    comm: Comm
    step_s: float
    compute_s: float
    comm_s: float
    offload_s: float
    optimizer_s: float = 0.0

    @property
    def fits(self) -> bool:
        return self.max_micro_batch >= 1 and self.peak_bytes <= self._usable

    _usable: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.stage}" + (f" + offload {self.offload}" if self.offload else "")


@dataclass
class Plan:
    kind: str
    shape: Shape
    target: Target
    seq_len: int
    mask_fraction: float
    precision: str
    total_params: int
    trainable_params: int
    micro_batch: int
    global_batch: int
    accum: int
    checkpointing: bool
    stage: int
    offload: str
    usable_bytes: float
    rows: list[Row]
    rows_ac: list[Row]
    flops_per_token: float
    mfu: float
    mfu_source: str
    run_tokens: float
    price_per_gpu_hour: float | None
    assumptions: list[str] = field(default_factory=list)

    @property
    def configured(self) -> Row:
        rows = self.rows_ac if self.checkpointing else self.rows
        return next(r for r in rows if r.stage == self.stage and r.offload == self.offload)

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.seq_len / self.configured.step_s

    @property
    def run_s(self) -> float:
        return self.run_tokens / self.tokens_per_s

    @property
    def device_hours(self) -> float:
        return self.run_s / 3600 * self.target.world_size

    def alternatives(self) -> list[str]:
        """What would fit instead, cheapest first (in step time)."""
        out = []
        for ac, rows in ((False, self.rows), (True, self.rows_ac)):
            for r in sorted(rows, key=lambda r: r.step_s):
                if r.max_micro_batch >= 1:
                    knob = "zero.stage=" + str(r.stage)
                    if r.offload:
                        knob += " zero.offload_optimizer=true" + (
                            " zero.offload_params=true" if "params" in r.offload else ""
                        )
                    if ac:
                        knob += " model.activation_checkpointing=true"
                    mb = min(r.max_micro_batch, self.micro_batch)
                    out.append(f"{knob} optim.micro_batch_size_per_rank={mb} (largest that fits: {r.max_micro_batch})")
        return out


def _offload_choices(stage: int) -> list[str]:
    return {0: [""], 1: ["", "optimizer"], 2: ["", "optimizer"], 3: ["", "optimizer", "optimizer+params"]}[stage]


def _row(
    shape: Shape,
    target: Target,
    stage: int,
    offload: str,
    *,
    total: int,
    trainable: int,
    micro: int,
    accum: int,
    seq_len: int,
    mask_fraction: float,
    bf16: bool,
    checkpointing: bool,
    usable: float,
    achieved_flops: float,
    reduce_scatter: bool,
    bucket_elements: float,
    zero3: Zero3Work,
) -> Row:
    n = target.world_size
    dtype_bytes = 2 if bf16 else 4
    states = model_states(total, trainable, stage, n, bf16, "optimizer" in offload, "params" in offload)
    act = activation_bytes(shape, micro, seq_len, mask_fraction, dtype_bytes, checkpointing)
    one = activation_bytes(shape, 1, seq_len, mask_fraction, dtype_bytes, checkpointing)
    zero = activation_bytes(shape, 0, seq_len, mask_fraction, dtype_bytes, checkpointing)
    per_sample = one.peak - zero.peak
    on_host = 0.0 if target.device.is_gpu else states.host  # a CPU rank's "host" is its own memory
    peak = max(states.forward_end + act.peak, states.with_grads) + on_host
    fixed = states.forward_end + zero.peak + on_host
    host_fits = states.host <= target.device.host_memory_gib * GIB * HOST_USABLE / target.ranks_per_node
    fits = usable >= states.with_grads + on_host and usable > fixed and (host_fits or not target.device.is_gpu)
    max_mb = int((usable - fixed) // per_sample) if fits else 0
    comm = communication(trainable, total, stage, n, accum, dtype_bytes, reduce_scatter, bucket_elements, zero3)
    flops = micro * accum * seq_len * flops_per_token(shape, seq_len, mask_fraction)
    if checkpointing:  # the encoder's forward runs twice
        flops += micro * accum * seq_len * 2.0 * non_embedding_flops_params(shape)
    compute_s = flops / achieved_flops
    bw = target.device.intra_node_gbs if target.num_nodes == 1 else target.device.inter_node_gbs
    comm_s = comm.bytes / (bw * 1e9) + comm.collectives * target.device.latency_s
    # DeepSpeed overlaps stage 3's collectives on separate CUDA streams; gloo on CPU blocks the rank.
    # Its host work (hooks, fetch and release, bucket bookkeeping) blocks a CPU rank too; on a GPU the
    # host queues kernels ahead of the device, so it is taken as hidden (not measured there).
    overlapped = comm.overlapped and target.device.is_gpu
    if stage == 3 and n > 1 and not target.device.is_gpu:
        comm_s += zero3_host_s(zero3, target.device, accum)
    exposed = max(0.0, comm_s - compute_s) if overlapped else comm_s
    offload_s, optimizer_s = 0.0, 0.0
    if "optimizer" not in offload:  # AdamW over this rank's partition (all of it at stage 0), memory-bound
        optimizer_s = (trainable if stage == 0 else trainable / n) / target.device.optimizer_params_per_s
    if "optimizer" in offload:  # gradients to the host (fp32), weights back, and CPU Adam
        offload_s = trainable / n * (4 + dtype_bytes) / (target.device.pcie_gbs * 1e9)
        offload_s += trainable / n / CPU_ADAM_PARAMS_PER_S
    if "params" in offload:  # weights streamed in, per micro batch, forward and backward
        offload_s += accum * 2 * total / n * dtype_bytes / (target.device.pcie_gbs * 1e9)
    row = Row(
        stage,
        offload,
        states,
        act,
        per_sample,
        peak,
        max_mb,
        comm,
        compute_s + exposed + optimizer_s + offload_s,
        compute_s,
        comm_s,
        offload_s,
        optimizer_s,
    )
    row._usable = usable
    return row


def shape_of_pretrain(cfg: PretrainConfig, vocab_size: int | None) -> tuple[Shape, str]:
    m = cfg.model
    if m.init_from:
        return _shape_from_hf_dir(m.init_from, "model.init_from", m.dropout)
    manifest = _manifest(cfg)
    vocab = vocab_size or (manifest or {}).get("vocab_size")
    source = "the dataset's manifest" if not vocab_size and vocab else "--vocab-size"
    if not vocab:
        from .config import TokenizerConfig

        vocab, source = TokenizerConfig().vocab_size, "the tokenizer default (data.tokenizer.vocab_size)"
    shape = Shape(
        m.family,
        m.hidden_size,
        m.num_layers,
        m.num_heads,
        m.intermediate_size,
        int(vocab),
        m.max_position_embeddings,
        m.dropout,
    )
    return shape, f"vocab {vocab} from {source}"


def _manifest(cfg: PretrainConfig) -> dict | None:
    if not cfg.data.dataset_dir:
        return None
    path = Path(cfg.data.dataset_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path}: not a readable manifest (data.dataset_dir)") from None


def _shape_from_hf_dir(path: str, where: str, dropout: float) -> tuple[Shape, str]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{where}={path!r}: no config.json there, so the model's size is unknown to the planner")
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not readable JSON ({e})") from None
    family = hf.get("model_type")
    if family not in ACTIVATION_PER_TOKEN and (family, True) not in ACTIVATION_PER_TOKEN:
        raise ConfigError(f"{file}: model_type {family!r} is not one the planner knows (bert, roberta, modernbert)")
    positions = int(hf.get("max_position_embeddings", 512)) - (2 if family == "roberta" else 0)
    drop = hf.get("hidden_dropout_prob", hf.get("mlp_dropout", dropout))
    shape = Shape(
        family,
        int(hf["hidden_size"]),
        int(hf["num_hidden_layers"]),
        int(hf["num_attention_heads"]),
        int(hf["intermediate_size"]),
        int(hf["vocab_size"]),
        positions,
        float(drop or 0.0),
    )
    return shape, f"the model in {path}"


def classifier_params(s: Shape, cfg: FinetuneConfig, num_labels: int = 2) -> tuple[int, int]:
    """(total, trainable) parameters of a finetune as ``ptft_dist.adapters.build_classifier`` builds it:
    the sequence classifier (the MLM head replaced by the classification head), plus LoRA's A and B
    per target linear (the family's default targets) or IA3's vectors, plus peft's trainable copy of
    the head (``modules_to_save``)."""
    h, i, L, r, V = s.hidden, s.intermediate, s.layers, cfg.peft.r, s.vocab
    if s.family == "modernbert":
        mlm_head = h * h + h + V  # head dense + norm, decoder bias
        head = h * h + h + h * num_labels + num_labels  # head dense + norm, classifier
        lora = r * (4 * h + 2 * h + (h + 2 * i) + (i + h))  # Wqkv, attention Wo, Wi, mlp Wo
    else:
        mlm_head = h * h + h + 2 * h + V  # transform, LayerNorm, decoder bias
        head = h * h + h + h * num_labels + num_labels  # pooler (RoBERTa: classifier dense), classifier
        lora = r * (8 * h + (h + i) + (i + h))  # query, key, value, attention output, intermediate, output
    ia3 = 3 * h + i  # keys, values, attention output (out features); feed-forward output (in features)
    base = num_params(s) - mlm_head + head
    method = cfg.peft.method
    if method == "full":
        return base, base
    if method == "head":
        return base, head
    adapters = L * (ia3 if method == "ia3" else lora)
    return base + adapters + head, adapters + head


def measured_rate(run_dir: str, target: Target, fpt: float) -> tuple[float | None, str]:
    """MFU (GPU) or achieved TFLOP/s per rank (CPU) from a run's metrics.jsonl, when it has them."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, ""
    mfus, tps = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row.get("mfu"), (int, float)):
            mfus.append(float(row["mfu"]))
        if isinstance(row.get("tokens_per_s"), (int, float)) and row.get("split", "train") == "train":
            tps.append(float(row["tokens_per_s"]))
    if target.device.is_gpu and mfus:
        return sorted(mfus)[len(mfus) // 2], f"measured: median of {len(mfus)} rows of {path}"
    if not target.device.is_gpu and tps:
        median = sorted(tps)[len(tps) // 2]
        return median * fpt / target.world_size / 1e12, f"measured: median tokens/s of {len(tps)} rows of {path}"
    return None, ""


def make_plan(
    cfg: PretrainConfig | FinetuneConfig,
    target: Target,
    *,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    tokens: float | None = None,
    mfu: float | None = None,
    price_per_gpu_hour: float | None = None,
    use_measured: bool = True,
) -> Plan:
    """The plan of ``cfg`` on ``target`` (whose world size replaces ``scaling.num_workers``)."""
    assumptions = []
    n = target.world_size
    optim = cfg.optim
    per_step = optim.micro_batch_size_per_rank * n
    if optim.global_batch_size % per_step:
        raise ConfigError(
            f"optim.global_batch_size={optim.global_batch_size} is not divisible by "
            f"optim.micro_batch_size_per_rank={optim.micro_batch_size_per_rank} x {n} ranks = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}"
        )
    accum = optim.global_batch_size // per_step
    if isinstance(cfg, PretrainConfig):
        kind = "pretrain"
        shape, vocab_note = shape_of_pretrain(cfg, vocab_size)
        manifest = _manifest(cfg) or {}
        seq = seq_len or manifest.get("seq_len")
        if not seq:
            from .config import DataBuildConfig

            seq = DataBuildConfig().seq_len
            assumptions.append(f"sequence length {seq} (the data build default; --seq-len to change)")
        mask_fraction = cfg.data.mlm_probability
        total = num_params(shape)
        trainable = total
        checkpointing = cfg.model.activation_checkpointing
    else:
        kind = "finetune"
        if not cfg.base_model:
            raise ConfigError("base_model is not set: the planner reads the model's size from its config.json")
        shape, vocab_note = _shape_from_hf_dir(cfg.base_model, "base_model", 0.0)
        seq = seq_len or cfg.task.max_length
        if not seq:
            seq = 128
            assumptions.append(
                f"sequence length {seq}: task.max_length is chosen from the data when the job starts (--seq-len to "
                "change)"
            )
        mask_fraction = 0.0  # a classification head: no vocabulary projection
        total, trainable = classifier_params(shape, cfg)
        checkpointing = False
        assumptions.append(
            "finetuning: every batch padded to task.max_length, 2 labels; activations as for pretraining "
            "(an upper bound for LoRA, whose frozen linears keep less)"
        )
    assumptions.append(vocab_note)
    precision = cfg.zero.precision
    if precision == "auto":
        precision = "bf16" if target.device.is_gpu else "fp32"
    bf16 = precision in ("bf16", "fp16")
    fpt = flops_per_token(shape, seq, mask_fraction)
    source = ""
    if mfu is None and use_measured:
        mfu_measured, source = measured_rate(cfg.run_dir, target, fpt)
        if mfu_measured is not None:
            mfu = mfu_measured if target.device.is_gpu else mfu_measured / target.device.peak_tflops
    if mfu is None:
        mfu = target.device.default_mfu
        source = f"default for {target.device.name} (docs/scaling.md)" if target.device.is_gpu else target.device.source
    elif not source:
        source = "given (--mfu)"
    achieved = target.device.peak_tflops * 1e12 * mfu
    usable = target.memory_gib * GIB - (RESERVE_GIB * GIB if target.device.is_gpu else 0.0)
    reduce_scatter = cfg.zero.reduce_scatter if cfg.zero.reduce_scatter is not None else target.device.is_gpu
    bucket = cfg.zero.bucket_elements or max(shape.hidden**2, 0 if target.device.is_gpu else 5_000_000)
    # ZeRO-3 keeps hidden^2 buckets on CPU too (ptft_dist/ds_config.py); tensors of at most 10 x hidden persist.
    # A finetune is counted as its encoder's masked LM (the head and LoRA's small tensors aside).
    zero3 = zero3_work(
        parameter_numels(shape), num_modules(shape), 10 * shape.hidden, cfg.zero.bucket_elements or shape.hidden**2
    )
    common = dict(
        total=total,
        trainable=trainable,
        micro=optim.micro_batch_size_per_rank,
        accum=accum,
        seq_len=seq,
        mask_fraction=mask_fraction,
        bf16=bf16,
        usable=usable,
        achieved_flops=achieved,
        reduce_scatter=reduce_scatter,
        bucket_elements=bucket,
        zero3=zero3,
    )
    rows = [
        _row(shape, target, st, off, checkpointing=False, **common) for st in range(4) for off in _offload_choices(st)
    ]
    rows_ac = [
        _row(shape, target, st, off, checkpointing=True, **common) for st in range(4) for off in _offload_choices(st)
    ]
    offload = "optimizer" if cfg.zero.offload_optimizer else ""
    if cfg.zero.offload_params:
        offload = "optimizer+params" if offload else "optimizer+params"
    run_tokens = tokens or _run_tokens(cfg, seq)
    assumptions += [
        f"{precision} training; {achieved / 1e9:.0f} GFLOP/s per CPU rank ({source})"
        if not target.device.is_gpu
        else f"{precision} training; MFU {mfu:.0%} of {target.device.peak_tflops:.0f} TFLOP/s ({source})",
        "peak = max(states at the end of the forward + activations, states with gradients); allocator transients "
        "(the logits' gradient at the start of the backward) are not counted"
        + (f"; {RESERVE_GIB} GiB per GPU kept free" if target.device.is_gpu else ""),
        f"communication at {target.device.intra_node_gbs if target.num_nodes == 1 else target.device.inter_node_gbs} "
        f"GB/s per rank ({'inside one node' if target.num_nodes == 1 else 'across nodes'}) + "
        f"{target.device.latency_s * 1e6:.0f} us per collective; exposed for stages 0-2, "
        + (
            "overlapped for stage 3 (its host work taken as hidden)"
            if target.device.is_gpu
            else "and for stage 3 (gloo blocks), with its measured host work per module, tensor and bucket"
        ),
    ]
    return Plan(
        kind,
        shape,
        target,
        seq,
        mask_fraction,
        precision,
        total,
        trainable,
        optim.micro_batch_size_per_rank,
        optim.global_batch_size,
        accum,
        checkpointing,
        cfg.zero.stage,
        offload,
        usable,
        rows,
        rows_ac,
        fpt,
        mfu,
        source,
        run_tokens,
        price_per_gpu_hour,
        assumptions,
    )


def _run_tokens(cfg: PretrainConfig | FinetuneConfig, seq_len: int) -> float:
    """The configured run length in tokens (``optim.max_steps``, ``max_tokens``, or ``max_epochs`` of the
    dataset's train samples)."""
    optim = cfg.optim
    if optim.max_tokens is not None:
        return float(optim.max_tokens)
    if optim.max_steps is not None:
        return float(optim.max_steps) * optim.global_batch_size * seq_len
    manifest = _manifest(cfg) if isinstance(cfg, PretrainConfig) else None
    if not manifest:
        raise ConfigError(
            f"optim.max_epochs={optim.max_epochs!r}: the run length in tokens needs the dataset's manifest "
            "(data.dataset_dir); give the run length with --tokens instead"
        )
    return optim.max_epochs * manifest["splits"]["train"]["num_samples"] * seq_len


# --------------------------------------------------------------------------- text


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}" if b < 10 * GIB else f"{b / GIB:.1f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(p: Plan) -> str:
    """The plan as text: the setting, one table per checkpointing choice, the configured row's time and cost,
    what would fit if it does not, and what the plan assumes."""
    t = p.target
    lines = [
        f"plan: {p.kind}, {p.shape.describe()}: {p.total_params / 1e6:.1f}M parameters"
        + (f" ({p.trainable_params / 1e6:.2f}M trainable)" if p.trainable_params != p.total_params else ""),
        f"target: {t.describe()}; {p.precision}; seq {p.seq_len}; micro batch {p.micro_batch} per rank x "
        f"{p.accum} accumulation x {t.world_size} ranks = global batch {p.global_batch} "
        f"({p.global_batch * p.seq_len:,} tokens per step); usable memory per rank {_gib(p.usable_bytes)} GiB",
    ]
    for ac, rows in ((False, p.rows), (True, p.rows_ac)):
        lines.append("")
        lines.append(
            f"activation checkpointing {'on' if ac else 'off'}: per rank, GiB (micro batch {p.micro_batch}), "
            "communication per step, step time"
        )
        lines.append(
            f"{'ZeRO':<26} {'params':>7} {'grads':>7} {'optim':>7} {'host':>7} {'activ.':>7} {'peak':>7} "
            f"{'max micro':>9} {'comm GB':>8} {'step ms':>9}"
        )
        for r in rows:
            mark = "*" if (r.stage, r.offload, ac) == (p.stage, p.offload, p.checkpointing) else " "
            lines.append(
                f"{mark}{r.label:<25} {_gib(r.states.params):>7} {_gib(r.states.grads):>7} "
                f"{_gib(r.states.optimizer):>7} {_gib(r.states.host):>7} {_gib(r.activations.peak):>7} "
                f"{_gib(r.peak_bytes):>7} {r.max_micro_batch:>9} {r.comm.bytes / 1e9:>8.3f} {r.step_s * 1e3:>9.1f}"
            )
    c = p.configured
    lines.append("")
    lines.append(
        f"configured (*): stage {c.label}, checkpointing {'on' if p.checkpointing else 'off'}: step "
        f"{c.step_s * 1e3:.1f} ms = compute {c.compute_s * 1e3:.1f} + communication {c.comm_s * 1e3:.1f}"
        f"{' (overlapped)' if c.comm.overlapped and t.device.is_gpu else ''}"
        + (f" + optimizer {c.optimizer_s * 1e3:.1f}" if c.optimizer_s else "")
        + (f" + offload {c.offload_s * 1e3:.1f}" if c.offload_s else "")
        + f"; {p.tokens_per_s:,.0f} tokens/s"
    )
    if c.comm_s > c.compute_s:
        lines.append("  the network, not the device, bounds this step (communication > compute)")
    units = "GPU-hours" if t.device.is_gpu else "rank-hours"
    run = f"run of {p.run_tokens:.3g} tokens: {_duration(p.run_s)}, {p.device_hours:,.0f} {units}"
    if p.price_per_gpu_hour is not None:
        run += f", ${p.device_hours * p.price_per_gpu_hour:,.0f} at ${p.price_per_gpu_hour}/{units[:-1]}"
    lines.append(run)
    if c.max_micro_batch < p.micro_batch:
        need = c.peak_bytes
        lines.append(
            f"DOES NOT FIT: stage {c.label} needs {_gib(need)} GiB per rank at micro batch {p.micro_batch}, "
            f"{_gib(p.usable_bytes)} usable on a {t.device.name if t.device.is_gpu else 'CPU rank'}"
            + (f"; the largest micro batch that fits is {c.max_micro_batch}" if c.max_micro_batch else "")
        )
        alts = p.alternatives()
        if alts:
            lines.append("fits instead (fastest first):")
            lines += [f"  {a}" for a in alts[:4]]
        else:
            lines.append(
                "nothing fits on this target at any stage or offload (offloaded states need host memory too: "
                f"{HOST_USABLE:.0%} of {t.device.host_memory_gib:.0f} GiB per node): more ranks or a larger device"
            )
    else:
        lines.append(f"fits: largest micro batch at this stage {c.max_micro_batch}")
    lines.append("assumes: " + "; ".join(p.assumptions))
    return "\n".join(lines)


def summary_line(p: Plan) -> str:
    """Two lines for --dry-run."""
    c = p.configured
    fit = "fits" if c.max_micro_batch >= p.micro_batch else "DOES NOT FIT"
    return (
        f"{p.total_params / 1e6:.1f}M parameters on {p.target.describe()}: peak {_gib(c.peak_bytes)} GiB per rank at "
        f"stage {c.label} ({fit}; max micro batch {c.max_micro_batch}); step {c.step_s * 1e3:.0f} ms, "
        f"{p.tokens_per_s:,.0f} tokens/s, run {_duration(p.run_s)} (`ptft plan` for the tables)"
    )


# --------------------------------------------------------------------------- command line


def add_arguments(sp) -> None:
    """The options of `ptft plan` (an argparse parser)."""
    sp.add_argument("--config", help="a pretrain or finetune YAML file or preset (default: pretrain_tiny)")
    sp.add_argument(
        "--gpus", help="target GPUs: COUNTxKIND (8xH100) or KIND with --nodes; kinds: " + ", ".join(DEVICES)
    )
    sp.add_argument("--nodes", type=int, help="nodes (with --gpus KIND or COUNTxKIND)")
    sp.add_argument("--gpus-per-node", type=int, help="GPUs (or CPU ranks) per node (default: 8; V100 DGX-2: 16)")
    sp.add_argument("--cpus", type=int, help="target CPU ranks instead (one core each, fp32, gloo)")
    sp.add_argument(
        "--cpu-gflops", type=float, help=f"achieved GFLOP/s of one CPU rank (default {CPU.peak_tflops * 1e3:.0f})"
    )
    sp.add_argument("--memory-gib", type=float, help="memory per rank (default: the device's; CPU: host / ranks)")
    sp.add_argument("--seq-len", type=int, help="tokens per sample (default: the dataset's manifest, else 128)")
    sp.add_argument("--vocab-size", type=int, help="vocabulary (default: the dataset's manifest, else 8192)")
    sp.add_argument("--tokens", type=float, help="run length in tokens (default: the config's), e.g. 100e9")
    sp.add_argument(
        "--mfu", type=float, help="model FLOPs utilisation, 0-1 (default: measured in run_dir, else per device)"
    )
    sp.add_argument("--price-per-gpu-hour", type=float, help="price of one GPU-hour (or rank-hour), for the cost")
    sp.add_argument(
        "--sweep",
        help="GPU (or CPU rank) counts, e.g. 8,64,512: one summary row each, keeping the micro batch and "
        "accumulation per rank (the global batch grows with the ranks)",
    )
    sp.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides of the config")


def load_config(config: str | None, overrides: list[str], target: Target) -> PretrainConfig | FinetuneConfig:
    """A pretrain or finetune config (told apart by its sections) with the target's world size."""
    from . import config as C

    raw, path = C.read_yaml(config or C.DEFAULT_PRESETS["pretrain"])
    if "pretrain" in raw and "finetune" in raw:
        raise ConfigError(f"{path}: a pipeline config; plan its steps one by one (a pretrain or a finetune config)")
    command = "finetune" if any(k in raw for k in ("task", "peft", "base_model")) else "pretrain"
    extra = [f"scaling.num_workers={target.world_size}", f"scaling.use_gpu={str(target.device.is_gpu).lower()}"]
    return C.load(command, config, [*overrides, *extra])


def from_args(args) -> tuple[Plan, str]:
    """`ptft plan`: the plan and its text. Raises ConfigError on a bad option or config."""
    for name in ("nodes", "gpus_per_node", "cpus", "seq_len", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.gpus is None and args.cpus is None:
        raise ConfigError("give a target: --gpus 8xH100 (or --gpus H100 --nodes 4 --gpus-per-node 8), or --cpus 2")
    if args.sweep:
        return _sweep(args)
    target = parse_target(args.gpus, args.nodes, args.gpus_per_node, args.cpus, args.cpu_gflops, args.memory_gib)
    p = _plan_for(args, load_config(args.config, list(args.overrides), target), target)
    return p, format_plan(p)


def _plan_for(args, cfg, target) -> Plan:
    """The plan of ``cfg`` on ``target`` with the command line's figures."""
    return make_plan(
        cfg,
        target,
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
        tokens=args.tokens,
        mfu=args.mfu,
        price_per_gpu_hour=args.price_per_gpu_hour,
    )


def _sweep(args) -> tuple[Plan, str]:
    """One row per rank count: the configured stage, micro batch and accumulation per rank."""
    try:
        counts = [int(c) for c in args.sweep.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep {args.sweep!r}: give rank counts separated by commas, e.g. 8,64,512") from None
    kind = (args.gpus or "").rpartition("x")[2] if args.gpus else None
    base = load_config(
        args.config, list(args.overrides), parse_target(cpus=1) if not kind else parse_target(f"1x{kind}")
    )
    per_rank = base.optim.global_batch_size  # one rank: micro x accumulation
    header = (
        f"{'ranks':>6} {'nodes':>5} {'global batch':>12} {'peak GiB':>8} {'max micro':>9} {'compute ms':>10} "
        f"{'comm ms':>8} {'step ms':>8} {'tokens/s':>12} {'run':>10} {'GPU-hours':>10}"
        + (f" {'cost':>10}" if args.price_per_gpu_hour is not None else "")
        + "  bound"
    )
    lines, last = [], None
    for count in counts:
        if kind:
            target = parse_target(
                f"{count}x{kind}", args.nodes if count > 1 else None, args.gpus_per_node, None, None, args.memory_gib
            )
        else:
            target = parse_target(
                cpus=count, gpus_per_node=args.gpus_per_node, cpu_gflops=args.cpu_gflops, memory_gib=args.memory_gib
            )
        cfg = load_config(args.config, [*args.overrides, f"optim.global_batch_size={per_rank * count}"], target)
        p = _plan_for(args, cfg, target)
        c = p.configured
        bound = "network" if c.comm_s > c.compute_s else "device"
        if c.max_micro_batch < p.micro_batch:
            bound = "DOES NOT FIT"
        cost = f" {p.device_hours * args.price_per_gpu_hour:>10,.0f}" if args.price_per_gpu_hour is not None else ""
        lines.append(
            f"{target.world_size:>6} {target.num_nodes:>5} {p.global_batch:>12,} {_gib(c.peak_bytes):>8} "
            f"{c.max_micro_batch:>9} {c.compute_s * 1e3:>10.1f} {c.comm_s * 1e3:>8.1f} {c.step_s * 1e3:>8.1f} "
            f"{p.tokens_per_s:>12,.0f} {_duration(p.run_s):>10} {p.device_hours:>10,.0f}{cost}  {bound}"
        )
        last = p
    assert last is not None
    head = (
        f"sweep: {last.kind}, {last.shape.describe()}: {last.total_params / 1e6:.1f}M parameters; {last.precision}; "
        f"seq {last.seq_len}; stage {last.configured.label}, checkpointing {'on' if last.checkpointing else 'off'}; "
        f"micro batch {last.micro_batch} x {last.accum} accumulation per rank; run {last.run_tokens:.3g} tokens"
    )
    return last, "\n".join([head, header, *lines, "assumes: " + "; ".join(last.assumptions)])


def dry_run_lines(cfg: PretrainConfig | FinetuneConfig, name: str) -> list[str]:
    """The planner's summary for --dry-run, on the config's own workers (GPUs: assumed H100)."""
    s = cfg.scaling
    target = parse_target(gpus=f"{s.num_workers}xH100") if s.use_gpu else parse_target(cpus=s.num_workers)
    try:
        p = make_plan(cfg, target)
    except ConfigError as e:
        return [f"# {name}: plan: not available ({e})"]
    assumed = " (GPUs assumed H100: `ptft plan --gpus` for others)" if s.use_gpu else ""
    return [f"# {name}: plan{assumed}: {summary_line(p)}"]
