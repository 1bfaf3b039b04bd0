"""The planner (ptft_dist/plan.py): each term against hand-computed values on a tiny model, the
parameter count and activation bytes against the real models, fits and what fits instead, and
`ptft plan` / `--dry-run` on the command line."""

from __future__ import annotations

import gc
import json

import pytest

from ptft_dist import config as C
from ptft_dist import plan as P
from ptft_dist.cli import main

#: The tiny model of the hand computations: BERT, hidden 64, 2 layers, FFN 256, vocab 1000, 64 positions.
TINY = P.Shape("bert", hidden=64, layers=2, heads=2, intermediate=256, vocab=1000, max_positions=64, dropout=0.1)


def test_parameter_count_by_hand():
    h, i, V, L = 64, 256, 1000, 2
    embeddings = V * h + 64 * h + 2 * h + 2 * h  # 64000 + 4096 + 128 + 128 = 68352
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # 16640 + 128 + 16640 + 16448 + 128 = 49984
    head = h * h + h + 2 * h + V  # 4096 + 64 + 128 + 1000 = 5288
    assert embeddings + L * layer + head == 173_608
    assert P.num_params(TINY) == 173_608


def test_flops_per_token_by_hand():
    # 6 x 2 x (4 x 64^2 + 2 x 64 x 256) + 12 x 2 x 64 x 32 + 6 x 64 x 1000 x 0.25
    assert P.flops_per_token(TINY, 32, 0.25) == 6 * 98_304 + 49_152 + 96_000 == 734_976


def test_model_states_by_hand():
    n, params = 4, 173_608
    s0 = P.model_states(params, params, 0, n, bf16=True)
    assert (s0.params, s0.grads, s0.optimizer) == (2 * params, 2 * params, 12 * params)
    assert s0.with_grads == 16 * params and s0.after_step == 14 * params
    s2 = P.model_states(params, params, 2, n, bf16=True)
    assert (s2.params, s2.grads, s2.optimizer) == (347_216, 86_804, 520_824)  # 2P, 2P/4, 12P/4
    assert P.model_states(params, params, 1, n, bf16=True) == s2  # DeepSpeed's stage 1 partitions gradients too
    s3 = P.model_states(params, params, 3, n, bf16=True)
    assert s3.with_grads == s3.after_step == 16 * params / 4  # the gradient partition stays after the step
    assert s3.forward_end == 4 * params + 2 * params  # + the whole model gathered from the forward
    f2 = P.model_states(params, params, 2, n, bf16=False)  # fp32: 4 + (4 + 12) / N
    assert f2.with_grads == 4 * params + 16 * params / 4 and f2.after_step == 4 * params + 12 * params / 4
    off = P.model_states(params, params, 2, n, bf16=True, offload_optimizer=True)
    assert (off.params, off.grads, off.optimizer, off.host) == (2 * params, 0, 0, 16 * params / 4)
    lora = P.model_states(params, 1000, 0, n, bf16=True)  # frozen weights have no gradients or Adam states
    assert (lora.params, lora.grads, lora.optimizer) == (2 * params, 2000, 12_000)


def test_activations_by_hand():
    # micro 2 x seq 32 = 64 tokens, 25% masked = 16 masked, fp32, dropout on
    a = P.activation_bytes(TINY, 2, 32, 0.25, 4, checkpointing=False)
    layers = 2 * 64 * (5 * 64 + 2 * 256) * 4  # 425,984
    outside = 64 * 64 * 4  # 16,384
    head = 16 * (4 * 64 + 1000) * 4  # 80,384
    inputs = 64 * 16  # int64 ids and labels
    assert a.kept == layers + outside + head + inputs == 523_776 and a.recompute == 0
    ac = P.activation_bytes(TINY, 2, 32, 0.25, 4, checkpointing=True)
    assert ac.kept == 2 * (64 * 64 * 4 + P.RNG_STATE_BYTES) + outside + head + inputs
    assert ac.recompute == layers / 2  # one layer again during the backward


def test_communication_by_hand():
    params = 173_608
    assert P.communication(params, params, 0, 4, 1, 4, True, 5e6, 2).bytes == 2 * params * 4 * 3 / 4
    rs = P.communication(params, params, 2, 4, 2, 2, True, 5e6, 2)
    assert rs.bytes == 2 * (params * 2 * 3 / 4) + params * 2 * 3 / 4  # reduce-scatter per micro + all-gather
    ar = P.communication(params, params, 2, 4, 2, 2, False, 5e6, 2)
    assert ar.bytes == 2 * (2 * params * 2 * 3 / 4) + params * 2 * 3 / 4  # all-reduce instead (the CPU default)
    work = P.zero3_work(P.parameter_numels(TINY), P.num_modules(TINY), 640, 4096)
    z3 = P.communication(params, params, 3, 4, 2, 2, True, 5e6, work)
    # per micro batch one all-gather of the weights (the forward's stay gathered) + one reduce-scatter
    assert z3.bytes == 2 * 2 * params * 2 * 3 / 4 and z3.overlapped
    assert z3.collectives == 2 * (16 + 29) + 26 + 2  # per micro: gathers + buckets; per step: persistent + 2
    assert P.communication(params, params, 3, 1, 2, 2, True, 5e6, work).bytes == 0


def test_zero3_work_by_hand():
    # threshold 60, buckets of 200, backward order 50, 50 | 300 | 10, 100: three buckets
    w = P.zero3_work([100, 10, 300, 50, 50], 7, 60, 200)
    assert (w.modules, w.params, w.gathers, w.buckets, w.persistent, w.regathered) == (7, 5, 2, 3, 3, 0.0)
    # TINY with the derived config (persist <= 10 x 64, buckets of 64^2): partitioned are the word and
    # position embeddings, 6 weights per layer, the head's dense weight and the decoder bias
    tiny = P.zero3_work(P.parameter_numels(TINY), P.num_modules(TINY), 640, 4096)
    assert (tiny.modules, tiny.params, tiny.gathers, tiny.persistent) == (54, 42, 2 + 2 * 6 + 2, 26)
    # backward: head 3 buckets (64 x 3 | 4096 | 1000 + layer 1's first three 64s), each layer 12 more
    # (16384 | 256 | 16384 | 64 x 3 | then 4096 and 64 alternately), embeddings 3 (64 x 2 + 128 | 4096 | 64000)
    assert tiny.buckets == 2 + 2 * 12 + 3 == 29
    big = P.zero3_work([2 * 10**9 // 3] * 3, 1, 640, 4096)  # past the 1e9 live parameters: gathered again
    assert big.regathered == 2 * 10**9 // 3 * 3 - 10**9


def test_zero3_host_time_by_hand(tmp_path):
    cfg = _tiny_cfg(run_dir=str(tmp_path / "none"), **{"zero.stage": 3})
    cpu = P.replace(
        P.CPU,
        peak_tflops=1e-3,
        intra_node_gbs=1.0,
        latency_s=1e-4,
        optimizer_params_per_s=1e8,
        zero3_module_s=1e-5,
        zero3_param_s=2e-5,
        zero3_persistent_s=4e-6,
        zero3_bucket_s=3e-5,
    )
    row = P.make_plan(cfg, P.Target(cpu, 1, 4, 1.0), seq_len=32, vocab_size=1000).configured
    params = 173_608
    host = 2 * (54 * 1e-5 + 16 * 2e-5 + 26 * 4e-6 + 29 * 3e-5)  # 2 micro batches: modules, tensors, buckets
    collectives = 2 * (16 + 29) + 26 + 2
    assert row.comm_s == pytest.approx(2 * 2 * params * 4 * 3 / 4 / 1e9 + collectives * 1e-4 + host)
    assert row.step_s == pytest.approx(row.compute_s + row.comm_s + params / 4 / 1e8)  # gloo blocks: all exposed
    gpu = P.make_plan(cfg, P.Target(P.DEVICES["H100"], 1, 4, 80.0), seq_len=32, vocab_size=1000).configured
    assert gpu.comm_s == pytest.approx(2 * 2 * params * 2 * 3 / 4 / 360e9 + collectives * 20e-6)  # no host term


def _tiny_cfg(**over) -> C.PretrainConfig:
    overrides = [
        "model.family=bert",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.intermediate_size=256",
        "model.max_position_embeddings=64",
        "model.dropout=0.1",
        "data.mlm_probability=0.25",
        "optim.global_batch_size=16",
        "optim.micro_batch_size_per_rank=2",
        "scaling.num_workers=4",
        *(f"{k}={v}" for k, v in over.items()),
    ]
    return C.load("pretrain", "pretrain_tiny", overrides)


def test_step_time_and_largest_micro_batch_by_hand(tmp_path):
    cfg = _tiny_cfg(run_dir=str(tmp_path / "none"), **{"zero.stage": 0})
    cpu = P.replace(P.CPU, peak_tflops=1e-3, intra_node_gbs=1.0, latency_s=1e-4, optimizer_params_per_s=1e8)
    usable_gib = 0.01
    plan = P.make_plan(cfg, P.Target(cpu, 1, 4, usable_gib), seq_len=32, vocab_size=1000)
    row = plan.configured
    assert plan.accum == 2 and plan.precision == "fp32"
    assert row.compute_s == pytest.approx(2 * 2 * 32 * 734_976 / 1e9)
    assert row.comm_s == pytest.approx(2 * 173_608 * 4 * 3 / 4 / 1e9 + 1 * 1e-4)  # one bucket
    assert row.optimizer_s == pytest.approx(173_608 / 1e8)  # stage 0: every rank updates every parameter
    assert row.step_s == pytest.approx(row.compute_s + row.comm_s + row.optimizer_s)
    assert plan.tokens_per_s == pytest.approx(16 * 32 / row.step_s)
    # largest micro batch: (usable - states after the step - activations of 0 samples) // per sample
    per_sample = 32 * (2 * (5 * 64 + 2 * 256) + 64 + 0.25 * (4 * 64 + 1000)) * 4 + 32 * 16
    assert row.act_per_sample == pytest.approx(per_sample)
    expected = int((usable_gib * 2**30 - 12 * 173_608) // per_sample)
    assert row.max_micro_batch == expected == 33
    assert plan.run_tokens == cfg.optim.max_steps * 16 * 32


def test_parameter_count_matches_the_real_models():
    models = pytest.importorskip("ptft_dist.models")
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    for family in ("bert", "roberta", "modernbert"):
        for h, layers, inter in ((64, 2, 256), (96, 3, 160)):
            cfg = C.ModelConfig(
                family=family,
                hidden_size=h,
                num_layers=layers,
                num_heads=2,
                intermediate_size=inter,
                max_position_embeddings=64,
            )
            model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=1000, special_ids=special))
            shape = P.Shape(family, h, layers, 2, inter, 1000, 64, cfg.dropout)
            assert P.num_params(shape) == models.num_params(model), (family, h)
            assert P.parameter_numels(shape) == [p.numel() for p in model.parameters()], (family, h)
            assert P.num_modules(shape) == len(list(model.modules())), (family, h)
            assert P.flops_per_token(shape, 32, 0.3) == models.flops_per_token(model.config, 32, 0.3)


def _live_bytes(torch) -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:
            continue
    return total


@pytest.mark.parametrize(
    "family,dropout,checkpointing",
    [("bert", 0.1, False), ("bert", 0.0, False), ("modernbert", 0.0, False), ("bert", 0.1, True)],
)
def test_activations_match_the_tensors_autograd_keeps(family, dropout, checkpointing):
    """The activation term against the live tensors at the end of a real forward (CPU, fp32)."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("ptft_dist.models")
    torch.manual_seed(0)
    h, layers, inter, vocab, micro, seq = 128, 3, 512, 2000, 4, 64
    cfg = C.ModelConfig(
        family=family,
        hidden_size=h,
        num_layers=layers,
        num_heads=4,
        intermediate_size=inter,
        dropout=dropout,
        activation_checkpointing=checkpointing,
    )
    special = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=vocab, special_ids=special))
    model.train()
    ids = torch.randint(10, vocab, (micro, seq))
    labels = torch.full_like(ids, -100).reshape(-1)
    labels[::5] = ids.reshape(-1)[::5]  # 20% masked, exactly
    labels = labels.reshape(micro, seq)
    before = _live_bytes(torch)
    out = model(input_ids=ids, labels=labels)
    measured = _live_bytes(torch) - before
    shape = P.Shape(family, h, layers, 4, inter, vocab, 512, dropout)
    planned = P.activation_bytes(shape, micro, seq, 52 / 256, 4, checkpointing).kept - micro * seq * 16
    assert planned == pytest.approx(measured, rel=0.05), (planned, measured)
    del out


def test_impossible_fit_names_what_fits_instead(capsys):
    # ~10B parameters: ZeRO-0 needs 16 bytes per parameter on every GPU, far over 80 GB
    big = ["model.hidden_size=4096", "model.num_layers=48", "model.num_heads=32", "model.intermediate_size=16384"]
    rc = main(
        ["plan", "--config", "pretrain_bert_large", "--gpus", "8xH100", "--vocab-size", "30522", "zero.stage=0", *big]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT: stage 0 needs" in out
    fits = out.split("fits instead (fastest first):")[1]
    assert "zero.stage=3" in fits and "zero.stage=0 " not in fits
    # ~170B parameters on one V100: even ZeRO-3 with everything offloaded needs 2.7 TB of host memory
    rc = main(
        [
            "plan",
            "--config",
            "pretrain_bert_large",
            "--gpus",
            "1xV100",
            "--vocab-size",
            "30522",
            "optim.global_batch_size=16",
            "model.hidden_size=12288",
            "model.num_layers=96",
            "model.num_heads=96",
            "model.intermediate_size=49152",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "nothing fits on this target" in out


def test_a_micro_batch_too_large_names_the_largest_that_fits(capsys):
    rc = main(
        [
            "plan",
            "--config",
            "pretrain_bert_base",
            "--gpus",
            "1xA100",
            "--seq-len",
            "512",
            "optim.micro_batch_size_per_rank=4096",
            "optim.global_batch_size=4096",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    largest = int(out.split("the largest micro batch that fits is ")[1].split()[0].rstrip(";"))
    assert 0 < largest < 4096
    assert f"optim.micro_batch_size_per_rank={largest} (largest that fits: {largest})" in out


def test_plan_on_nodes_and_cost(capsys):
    rc = main(
        [
            "plan",
            "--config",
            "pretrain_bert_base",
            "--gpus",
            "H100",
            "--nodes",
            "8",
            "--tokens",
            "100e9",
            "--price-per-gpu-hour",
            "2",
            "--vocab-size",
            "30522",
            "optim.global_batch_size=4096",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "64 x H100 (80 GiB) = 8 node(s) x 8" in out and "across nodes" in out
    hours = float(out.split(" GPU-hours")[0].split()[-1].replace(",", ""))
    cost = float(out.split(", $")[1].split()[0].replace(",", ""))
    assert cost == pytest.approx(2 * hours, rel=0.01)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--gpus", "8xB300"], "unknown GPU kind 'B300'"),
        (["--gpus", "8xH100", "optim.global_batch_size=100"], "optim.global_batch_size=100"),
        ([], "give a target"),
        (["--gpus", "8xH100", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
        (["--gpus", "12xH100", "--nodes", "2"], "do not fill 2 node(s)"),
    ],
)
def test_bad_options_exit_2_naming_them(argv, needle, capsys):
    assert main(["plan", "--config", "pretrain_bert_base", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_measured_mfu_from_the_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "tokens_per_s": 1.0, "mfu": m} for s, m in ((10, 0.40), (20, 0.44), (30, 0.42))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plan", "--config", "pretrain_bert_base", "--gpus", "8xH100", f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "MFU 42% of 989 TFLOP/s (measured: median of 3 rows" in out


def test_dry_run_prints_the_plan_summary(capsys):
    assert main(["pretrain", "--config", "pretrain_bert_base", "--dry-run", "--fields-only"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# pretrain: plan"))
    assert "GPUs assumed H100" in line and "per rank at stage 2 (fits" in line


def _save_tiny_classifier(family: str, out) -> None:
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    kw["max_position_embeddings"] = 66 if family == "roberta" else 64
    if family == "modernbert":
        kw.update(layer_types=["full_attention"] * 2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
        kw.update(cls_token_id=2, sep_token_id=3)
    cls = {"bert": "BertConfig", "roberta": "RobertaConfig", "modernbert": "ModernBertConfig"}[family]
    hf = getattr(transformers, cls)(num_labels=2, **kw)
    transformers.AutoModelForSequenceClassification.from_config(hf).save_pretrained(out)


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert"])
def test_finetune_parameter_counts_match_the_built_classifier(family, tmp_path):
    adapters = pytest.importorskip("ptft_dist.adapters")
    _save_tiny_classifier(family, tmp_path)
    shape, _ = P._shape_from_hf_dir(str(tmp_path), "base_model", 0.0)
    # by hand for BERT, LoRA r=16: 2 layers x 16 x (10 x 64 + 2 x 256) + head (64^2 + 64 + 2 x 64 + 2)
    if family == "bert":
        cfg = C.load("finetune", "finetune_tiny", [f"base_model={tmp_path}", "peft.method=lora", "peft.r=16"])
        assert P.classifier_params(shape, cfg)[1] == 2 * 16 * (640 + 512) + 4290 == 41_154
    methods = ["lora", "ia3", "full"] + ([] if family == "bert" else ["head"])
    for method in methods:
        cfg = C.load("finetune", "finetune_tiny", [f"base_model={tmp_path}", f"peft.method={method}"])
        model, _ = adapters.build_classifier(cfg, ["a", "b"], {"zero_optimization": {"stage": 0}})
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert P.classifier_params(shape, cfg) == (total, trainable), (family, method)


def test_plan_of_a_finetune(tmp_path, capsys):
    _save_tiny_classifier("bert", tmp_path)
    assert main(["plan", "--config", "finetune_sst2", "--gpus", "1xA100", f"base_model={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "plan: finetune, bert L=2 H=64" in out and "M trainable" in out
    assert main(["plan", "--config", "finetune_sst2", "--gpus", "1xA100", f"base_model={tmp_path / 'nope'}"]) == 2
    assert "no config.json there" in capsys.readouterr().err
