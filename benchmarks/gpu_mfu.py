"""Tokens/s and MFU of the masked-LM training step on one GPU: BERT-base and BERT-large at
sequence lengths 128 and 512, bf16 autocast, masked-only MLM head, fused AdamW.

    python benchmarks/gpu_mfu.py [--steps 30] [--compile] [--peak-tflops 989]

MFU = tokens/s x training FLOPs per token (ptft_dist.models.flops_per_token: 6 x non-embedding
parameters + attention + the head at masked positions) / the device's dense bf16 peak
(H100/H200: 989 TFLOP/s, detected by name, or --peak-tflops). Without a GPU it runs the same
code on a tiny model on the CPU (fp32), as a check that the script works; MFU is then only
printed when --peak-tflops is given. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptft_dist import models  # noqa: E402
from ptft_dist.config import ModelConfig  # noqa: E402
from ptft_dist.engine import PEAK_TFLOPS  # noqa: E402

SPECIAL = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
GPU_MODELS = {
    "bert-base": dict(family="bert", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": dict(family="bert", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}
CPU_MODELS = {"bert-tiny": dict(family="bert", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256)}
#: Tokens per optimizer step on GPU, per sequence length (batch = tokens / seq_len).
GPU_TOKENS = {128: 128 * 256, 512: 512 * 64}
CPU_TOKENS = {128: 128 * 8, 512: 512 * 2}


def measure(
    name: str,
    spec: dict,
    seq_len: int,
    tokens: int,
    steps: int,
    device: str,
    compile_: bool,
    vocab: int = 30522,
    mlm_p: float = 0.15,
) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**spec, max_position_embeddings=512)
    hf = models.mlm_config(cfg, vocab_size=vocab, special_ids=SPECIAL)
    model = models.build_mlm(cfg, hf).to(device)
    step_fn = torch.compile(model) if compile_ else model
    gpu = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    batch = tokens // seq_len
    ids = torch.randint(1000, vocab, (batch, seq_len), device=device)
    labels = torch.where(torch.rand(batch, seq_len, device=device) < mlm_p, ids, torch.full_like(ids, -100))
    warmup = 5
    for i in range(warmup + steps):
        if i == warmup:
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=gpu):
            loss = step_fn(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tps = tokens * steps / elapsed
    return {
        "model": name,
        "seq_len": seq_len,
        "batch": batch,
        "params_m": models.num_params(model) / 1e6,
        "tokens_per_s": tps,
        "tflops": tps * models.flops_per_token(hf, seq_len, mlm_p) / 1e12,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, help="device peak (dense bf16 TFLOP/s) for MFU")
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = a.peak_tflops or (
        next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if gpu else None
    )
    specs, tokens = (GPU_MODELS, GPU_TOKENS) if gpu else (CPU_MODELS, CPU_TOKENS)
    rows = []
    for name, spec in specs.items():
        for seq_len in (128, 512):
            r = measure(name, spec, seq_len, tokens[seq_len], a.steps if gpu else 3, device, a.compile)
            r["mfu"] = r["tflops"] / peak if peak else None
            rows.append(r)
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    label = torch.cuda.get_device_name() if gpu else "CPU (tiny model: a check that the script runs, not a measurement)"
    print(f"device: {label}; peak {peak or 'unknown'} TFLOP/s; compile={a.compile}")
    print(f"{'model':<11} {'seq':>4} {'batch':>5} {'params M':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{r['model']:<11} {r['seq_len']:>4} {r['batch']:>5} {r['params_m']:>9.1f} {r['tokens_per_s']:>11.0f} "
            f"{r['tflops']:>8.1f} {mfu:>6}"
        )
    print(json.dumps({"device": label, "peak_tflops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
