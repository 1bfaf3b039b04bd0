"""``ptft``: the command line.

    ptft data build [--config FILE|PRESET] [--run-dir DIR] [--dry-run] [section.field=value ...]
    ptft pretrain   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft finetune   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft pipeline   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft report     RUN_DIR [RUN_DIR ...] [--out DIR]
    ptft presets

Without --config each command uses its tiny preset. A configuration or input error exits with
code 2 and a one-paragraph message, before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import config as C
from .jobs import Preempted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptft", description="Masked-LM pretraining and LoRA finetuning on Ray Train x DeepSpeed."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, ray: bool = True) -> None:
        sp.add_argument("--config", help="YAML file or the name of a shipped preset (see `ptft presets`)")
        sp.add_argument("--run-dir", help="run directory (overrides run_dir)")
        sp.add_argument(
            "--dry-run",
            action="store_true",
            help="print the resolved config, the batch arithmetic and the DeepSpeed JSON; start nothing",
        )
        if ray:
            sp.add_argument(
                "--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster in this process)"
            )
            sp.add_argument(
                "--ray-logs",
                action="store_true",
                help="show the workers' and Ray's own log lines here, not only ptft's progress lines (or "
                "PTFT_RAY_LOGS=1)",
            )
        sp.add_argument(
            "overrides",
            nargs="*",
            metavar="section.field=value",
            help="dotted overrides, e.g. optim.lr=3e-4 zero.stage=3",
        )

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    common(
        data_sub.add_parser("build", help="text files -> tokenizer -> packed WebDataset shards + manifest"), ray=False
    )
    common(sub.add_parser("pretrain", help="masked-LM pretraining on Ray Train + DeepSpeed"))
    common(sub.add_parser("finetune", help="LoRA sequence classification on Ray Train + DeepSpeed"))
    common(sub.add_parser("pipeline", help="data build -> pretrain -> finetune in one Ray session"))
    exp = sub.add_parser(
        "export", help="an HF directory (safetensors + tokenizer) from a pretraining checkpoint or run directory"
    )
    exp.add_argument("checkpoint", help="a checkpoint folder, or a run directory (its newest complete checkpoint)")
    exp.add_argument("--out", required=True, help="output HF directory")
    rep = sub.add_parser(
        "report", help="PNG plots and an HTML page from run directories (offline; several runs overlay)"
    )
    rep.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory (metrics.jsonl, summary.json, config.yaml) or a pipeline's",
    )
    rep.add_argument("--out", help="output folder (default: RUN_DIR/report for one run, ./report for several)")
    pred = sub.add_parser("predict", help="apply a finetuned adapter (or model) to a CSV/TSV/JSONL/Parquet file")
    pred.add_argument("model", help="an adapter or model directory written by `ptft finetune`")
    pred.add_argument("--input", required=True, help="file with the texts")
    pred.add_argument("--out", required=True, help="CSV to write: text(s), prediction, probability")
    pred.add_argument("--text-column", default="text")
    pred.add_argument("--text-pair-column")
    pred.add_argument("--max-length", type=int, default=128)
    sub.add_parser("presets", help="list the shipped config presets")
    return p


def _dry_run(command: str, cfg) -> None:
    print("# resolved config")
    print(C.dump_yaml(cfg))
    sections = (
        [cfg.pretrain, *cfg.finetune] if command == "pipeline" else [cfg] if command in ("pretrain", "finetune") else []
    )
    for part in sections:
        name = "pretrain" if isinstance(part, C.PretrainConfig) else f"finetune {part.name}"
        seq_len = cfg.data.seq_len if command == "pipeline" and name == "pretrain" else None
        print(f"# {name}: {C.batch_arithmetic(part.optim, part.scaling, seq_len)}")
        print(f"# {name}: DeepSpeed config (on {'GPU' if part.scaling.use_gpu else 'CPU'})")
        hidden = part.model.hidden_size if isinstance(part, C.PretrainConfig) and not part.model.init_from else None
        print(
            json.dumps(
                C.deepspeed_config(
                    part.optim, part.zero, part.scaling, on_gpu=part.scaling.use_gpu, hidden_size=hidden
                ),
                indent=2,
            )
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "presets":
        for name in C.list_presets():
            print(name)
        return 0
    if args.command == "report":
        return _report(args.run_dirs, args.out)
    command = args.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    from .data.build import DataError

    if command == "predict":
        from . import jobs
        from .data.build import DataError

        try:
            made = jobs.predict(
                args.model,
                args.input,
                args.out,
                text_column=args.text_column,
                text_pair_column=args.text_pair_column,
                max_length=args.max_length,
            )
        except (DataError, ValueError, OSError) as e:
            print(f"ptft predict: error: {e}", file=sys.stderr)
            return 2
        print(f"predictions: {made['artifacts']['predictions']} ({made['metrics']['num_examples']} examples)")
        return 0
    if command == "export":
        from . import jobs

        try:
            summary = jobs.export(args.checkpoint, args.out)
        except (ValueError, OSError) as e:
            print(f"ptft export: error: {e}", file=sys.stderr)
            return 2
        print(f"hf_model: {summary['artifacts']['hf_model']} (step {summary['metrics']['step']})")
        return 0
    if getattr(args, "ray_logs", False):
        os.environ["PTFT_RAY_LOGS"] = "1"
    try:
        overrides = list(args.overrides)
        if args.run_dir:
            overrides.append(f"run_dir={args.run_dir}")
        cfg = C.load(command, args.config, overrides)
        if args.dry_run:
            _dry_run(command, cfg)
            return 0
        from . import jobs

        if command == "data":
            summary = jobs.build_data(cfg.data, cfg.run_dir)
        elif command == "pretrain":
            summary = jobs.pretrain(cfg, address=args.address)
        elif command == "finetune":
            summary = jobs.finetune(cfg, address=args.address)
        else:
            summary = jobs.pipeline(cfg, address=args.address)
    except (C.ConfigError, DataError, OSError) as e:
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"ptft {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a run that failed on its workers, said in one line
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ptft {args.command}: interrupted", file=sys.stderr)
        return 130
    _print_summary(command, cfg, summary)
    return 0


def _print_summary(command: str, cfg, summary: dict) -> None:
    metrics, artifacts = summary["metrics"], summary["artifacts"]
    print()
    if command == "pipeline":
        pre = metrics["pretrain"]
        print(
            f"pretraining: eval MLM loss {pre['eval_mlm_loss']:.3f}, masked-token accuracy "
            f"{pre['eval_mlm_accuracy']:.1%} after {pre['steps']} steps ({pre['train_time_s']:.0f} s)"
        )
        print(f"{'finetune job':<16} {'status':<7} {'test acc':>9} {'macro-F1':>9} {'majority':>9} {'trainable':>10}")
        for row in metrics["jobs"]:
            m = metrics["finetune"][row["job"]]
            if row["status"] != "ok":
                print(f"{row['job']:<16} {'failed':<7} {row['error']}")
                continue
            print(
                f"{row['job']:<16} {'ok':<7} {m['test_accuracy']:>9.1%} {m['test_macro_f1']:>9.3f} "
                f"{m['test_majority_class_accuracy']:>9.1%} {m['trainable_params']:>10,}"
            )
        print(f"hf_model: {artifacts['hf_model']}")
        for name, paths in artifacts["finetune"].items():
            for k, v in paths.items():
                if k != "base_model":
                    print(f"{name} {k}: {v}")
        print(f"run directory: {os.path.abspath(cfg.run_dir)}")
        return
    for k, v in metrics.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    for k, v in artifacts.items():
        print(f"{k}: {v}")
    print(f"run directory: {os.path.abspath(cfg.run_dir)}")


def _report(run_dirs: list[str], out: str | None) -> int:
    from .report import ReportError, make_report

    try:
        made = make_report(run_dirs, out)
    except (ReportError, OSError) as e:
        print(f"ptft report: error: {e}", file=sys.stderr)
        return 2
    print(f"runs: {', '.join(made['runs'])}")
    for path in made["plots"]:
        print(f"plot: {path}")
    print(f"report: {made['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
