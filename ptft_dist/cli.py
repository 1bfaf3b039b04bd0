"""``ptft``: the command line.

    ptft data build [--config FILE|PRESET] [--run-dir DIR] [--dry-run] [section.field=value ...]
    ptft pretrain   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft finetune   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft pipeline   [--config ...] [--run-dir DIR] [--address ADDR] [--ray-logs] [--dry-run] [overrides ...]
    ptft export     CHECKPOINT --out DIR
    ptft predict    MODEL --input FILE --out FILE
    ptft report     RUN_DIR [RUN_DIR ...] [--out DIR]
    ptft runs       DIR
    ptft presets
    ptft plan       [--config ...] --gpus 8xH100 | --gpus H100 --nodes 4 | --cpus 2 [--tokens 100e9] [overrides ...]
    ptft config     show PRESET [overrides ...] | cp PRESET FILE [overrides ...]
    ptft completion bash|zsh|tcsh
    ptft --version

Without --config each command uses its default preset. Every check of the config and of the
files it names (:mod:`ptft_dist.preflight`) runs before Ray starts, with --dry-run or without;
a configuration or input error exits with code 2 and a one-paragraph message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from . import config as C
from .ds_config import deepspeed_config
from .errors import UserError
from .jobs import Preempted

#: What each training command's --help says, and an example.
ABOUT = {
    "data": (
        "Text files -> a tokenizer (trained, or data.tokenizer.path) -> packed WebDataset shards + manifest.json.",
        "ptft data build --run-dir runs/data 'data.inputs=[corpus/*.txt.gz]' data.seq_len=256",
        "check the inputs (every glob matches, each file's first record reads) and the output directory, print "
        "the resolved config; build nothing",
    ),
    "pretrain": (
        "Masked-LM pretraining on Ray Train workers under DeepSpeed ZeRO, streaming the shards of "
        "data.dataset_dir. Run the same command again with the same run dir to resume.",
        "ptft pretrain --config pretrain_tiny --run-dir runs/pre data.dataset_dir=runs/data/data optim.max_epochs=1",
        "check the dataset (manifest, shards, tokenizer hash, model vs vocabulary and seq_len), print the "
        "resolved config, the run length (steps = epochs = tokens), the batch arithmetic and the DeepSpeed JSON; "
        "start nothing",
    ),
    "finetune": (
        "Parameter-efficient sequence classification (LoRA, IA3, head, full) of base_model on Ray Train workers.",
        "ptft finetune --run-dir runs/ft base_model=runs/pre/export task.train_file=train.csv task.test_file=test.csv",
        "check base_model (weights, tokenizer, config) and the task files (columns, >= 2 labels), print the "
        "resolved config, the examples per class, the run length, the batch arithmetic and the DeepSpeed JSON; "
        "start nothing",
    ),
    "pipeline": (
        "Data build -> pretraining -> the finetune jobs, in one Ray session.",
        "ptft pipeline --run-dir runs/demo finetune.0.peft.method=full",
        "check the inputs and every job's task files, print the resolved config, the run lengths, the batch "
        "arithmetic and the DeepSpeed JSON of each step; start nothing",
    ),
}
NAMES = {"data": "data build"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptft", description="Masked-LM pretraining and LoRA finetuning on Ray Train x DeepSpeed."
    )
    p.add_argument("--version", action="version", version=f"ptft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent, name: str, key: str, ray: bool = True) -> argparse.ArgumentParser:
        about, example, dry_run = ABOUT[key]
        sp = parent.add_parser(
            name,
            help=about.split(". ")[0].rstrip("."),
            description=about,
            epilog=f"example:\n  {example}\n\nEvery check runs before Ray starts; errors exit with code 2.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument("--config", help="YAML file or the name of a shipped preset (see `ptft presets`)")
        sp.add_argument("--run-dir", help="run directory (overrides run_dir)")
        sp.add_argument("--dry-run", action="store_true", help=dry_run)
        sp.add_argument(
            "--fields-only",
            action="store_true",
            help="with --dry-run: check the config's fields but not the files it names (for a command that runs "
            "on another machine, whose paths do not exist here)",
        )
        if not ray:
            sp.add_argument(
                "--address", help="a Ray cluster to tokenize on (data.engine: ray); default: this machine's processes"
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
            help="dotted overrides, e.g. optim.lr=3e-4 zero.stage=3 (a pipeline's jobs by index: finetune.0.optim.lr)",
        )
        return sp

    data = sub.add_parser("data", help="dataset commands", description="Dataset commands.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    command(data_sub, "build", "data", ray=False)
    for name in ("pretrain", "finetune", "pipeline"):
        command(sub, name, name)
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
    pred.add_argument("--input", required=True, help="file with the texts, or mongodb://host/db.collection")
    pred.add_argument(
        "--out", required=True, help="CSV to write (text(s), prediction, probability), or mongodb://host/db.collection"
    )
    pred.add_argument("--text-column", default="text")
    pred.add_argument("--text-pair-column")
    pred.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate texts to this many tokens (default: the task.max_length the model was finetuned with)",
    )
    runs = sub.add_parser(
        "runs",
        help="a table of the run directories under DIR: command, state, steps, last eval metrics, start, duration",
    )
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder to search (default: runs)")
    sub.add_parser("presets", help="the shipped config presets: command, purpose, launch line")
    doc = sub.add_parser(
        "doctor",
        help="what this environment can run: torch/CUDA/NCCL/DeepSpeed/Ray versions, a real all-reduce",
        description="Checks this Python environment for real (exit 0: no check failed, 1: one did).",
    )
    doc.add_argument("--json", action="store_true", help="print the findings as JSON")
    from . import plan as planner

    planner.add_arguments(
        sub.add_parser(
            "plan",
            help="memory per rank, largest micro batch, communication, step time, run time and cost, per ZeRO stage",
            description="Plan a pretrain or finetune config on a target before paying for it (docs/scaling.md). "
            "Exit code 0: the configured setup fits; 1: it does not (what would fit is listed); 2: a bad option.",
        )
    )
    cfg = sub.add_parser(
        "config",
        help="start a config from a preset: show it, or copy it to a file you edit",
        description="Every field of a preset, resolved, as YAML that loads back to the same config.",
    )
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("show", help="print a preset as a complete YAML config")
    cp = cfg_sub.add_parser("cp", help="write a preset as a complete YAML config to FILE")
    for sp in (show, cp):
        sp.add_argument("preset", metavar="PRESET", help="a shipped preset (see `ptft presets`)")
        if sp is cp:
            sp.add_argument("file", metavar="FILE", help="YAML file to write (never overwritten without --force)")
            sp.add_argument("--force", action="store_true", help="overwrite FILE")
        sp.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted overrides")
    schema = cfg_sub.add_parser(
        "schema", help="the JSON Schema of a command's config, for editors that complete and check YAML"
    )
    schema.add_argument("schema_command", metavar="COMMAND", choices=list(C.COMMANDS), help=" | ".join(C.COMMANDS))
    schema.add_argument("--out", help="file to write (default: print it)")
    comp = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description='Shell completion for ptft, e.g. `eval "$(ptft completion bash)"` in ~/.bashrc.',
    )
    comp.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    return p


def _commented(text: str) -> str:
    return "\n".join(f"# {line}" if line else "#" for line in text.splitlines())


def extras(command: str, cfg, notes: list[str] = ()) -> list[str]:
    """The lines --dry-run prints after the config, each a YAML comment: the checks' notes,
    the batch arithmetic and the DeepSpeed JSON of each training step."""
    lines = [f"# {note}" for note in notes]
    sections = (
        [cfg.pretrain, *cfg.finetune] if command == "pipeline" else [cfg] if command in ("pretrain", "finetune") else []
    )
    for part in sections:
        name = "pretrain" if isinstance(part, C.PretrainConfig) else f"finetune {part.name}"
        seq_len = cfg.data.seq_len if command == "pipeline" and name == "pretrain" else None
        lines.append(f"# {name}: {C.batch_arithmetic(part.optim, part.scaling, seq_len)}")
        lines.append(f"# {name}: DeepSpeed config (on {'GPU' if part.scaling.use_gpu else 'CPU'})")
        hidden = part.model.hidden_size if isinstance(part, C.PretrainConfig) and not part.model.init_from else None
        ds = deepspeed_config(part.optim, part.zero, part.scaling, on_gpu=part.scaling.use_gpu, hidden_size=hidden)
        lines.append(_commented(json.dumps(ds, indent=2)))
    return lines


def _dry_run(command: str, cfg, notes: list[str]) -> None:
    print("# resolved config")
    print(C.dump_yaml(cfg), end="")
    print("\n".join(extras(command, cfg, notes)))
    if command in ("pretrain", "finetune"):
        from .plan import dry_run_lines

        print("\n".join(dry_run_lines(cfg, command)))


def config_yaml(preset: str, overrides: list[str] = (), file: str | None = None) -> tuple[str, object]:
    """A preset as a complete YAML config (every field, resolved) that loads back to the
    same config, its header and batch arithmetic as comments; and the config."""
    info = C.preset_info(preset)
    cfg = C.load(info.command, info.name, list(overrides))
    launch = f"ptft {NAMES.get(info.command, info.command)} --config {file or info.name}"
    header = [f"# {h}" if h else "#" for h in info.header if not h.startswith("Launch:")]
    head = "\n".join(
        [
            *header,
            f"# Launch: {launch}",
            f"# Every field of preset {info.name!r}, resolved (`ptft config show {info.name}`); each field's doc: "
            "docs/config.md",
        ]
    )
    return head + "\n" + C.dump_commented_yaml(cfg) + "\n".join(extras(info.command, cfg)) + "\n", cfg


def _config(args) -> int:
    if args.config_command == "schema":
        from .schema import json_schema

        text = json.dumps(json_schema(args.schema_command), indent=1) + "\n"
        if not args.out:
            print(text, end="")
            return 0
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}: put `# yaml-language-server: $schema={args.out}` at the top of a config")
        return 0
    if args.config_command == "show":
        print(config_yaml(args.preset, args.overrides)[0], end="")
        return 0
    out = Path(args.file)
    if out.exists() and not args.force:
        raise C.ConfigError(f"{out} exists; choose another file or add --force to overwrite it")
    text, _ = config_yaml(args.preset, args.overrides, file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    info = C.preset_info(args.preset)
    print(f"wrote {out}: edit it, then run `ptft {NAMES.get(info.command, info.command)} --config {out}`")
    return 0


def _plan(args) -> int:
    from . import plan as planner

    made, text = planner.from_args(args)
    print(text)
    return 0 if made.configured.max_micro_batch >= made.micro_batch else 1


def _presets() -> int:
    for name in C.list_presets():
        info = C.preset_info(name)
        print(f"{name:<22} {NAMES.get(info.command, info.command):<10} {info.purpose}")
        if info.launch:
            print(f"{'':<22} {'':<10} $ {info.launch}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ptft``: returns the exit code (0 ok, 2 a config or input error, 1 a failed run, 75
    stopped with a checkpoint, 130 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    where = f"ptft {NAMES.get(args.command, args.command)}"
    if args.command == "config":
        where += f" {args.config_command}"
    try:
        return _main(parser, args, where)
    except BrokenPipeError:  # `ptft presets | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UserError, OSError) as e:  # ConfigError, DataError, ...: named, one paragraph, no traceback
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, where: str) -> int:
    if args.command == "presets":
        return _presets()
    if args.command == "config":
        return _config(args)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, args.shell))
        return 0
    if args.command == "report":
        return _report(args.run_dirs, args.out)
    if args.command == "plan":
        return _plan(args)
    if args.command == "runs":
        return _runs(args.dir)
    if args.command == "doctor":
        from . import doctor

        found = doctor.collect()
        print(json.dumps(found.as_dict(), indent=2) if args.json else doctor.render(found))
        return 0 if found.ok else 1
    command = args.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

    if command == "predict":
        from . import jobs

        try:
            made = jobs.predict(
                args.model,
                args.input,
                args.out,
                text_column=args.text_column,
                text_pair_column=args.text_pair_column,
                max_length=args.max_length,
            )
        except ValueError as e:  # beyond UserError: a model directory or input that cannot be used
            print(f"{where}: error: {e}", file=sys.stderr)
            return 2
        print(f"predictions: {made['artifacts']['predictions']} ({made['metrics']['num_examples']} examples)")
        return 0
    if command == "export":
        from . import jobs

        try:
            summary = jobs.export(args.checkpoint, args.out)
        except ValueError as e:  # beyond UserError: an incomplete or foreign checkpoint (jobs, checkpoint.py)
            print(f"{where}: error: {e}", file=sys.stderr)
            return 2
        print(f"hf_model: {summary['artifacts']['hf_model']} (step {summary['metrics']['step']})")
        return 0
    if getattr(args, "ray_logs", False):
        os.environ["PTFT_RAY_LOGS"] = "1"
    if args.fields_only and not args.dry_run:
        print(f"{where}: error: --fields-only goes with --dry-run (a run always checks its files)", file=sys.stderr)
        return 2
    try:
        overrides = list(args.overrides)
        if args.run_dir:
            overrides.append(f"run_dir={args.run_dir}")
        cfg = C.load(command, args.config, overrides)
        from .preflight import Checked, preflight

        checked = Checked(cfg, ["files not checked (--fields-only)"]) if args.fields_only else preflight(command, cfg)
        if args.dry_run:
            _dry_run(command, cfg, checked.notes)
            return 0
        for note in checked.notes:
            logging.getLogger("ptft_dist.preflight").info("%s", note)
        from . import jobs
        from .runs import record_driver

        run = checked.cfg
        with record_driver(run.run_dir, NAMES.get(command, command)):
            if command == "data":
                summary = jobs.build_data(run.data, run.run_dir, address=args.address)
            elif command == "pretrain":
                summary = jobs.pretrain(run, address=args.address)
            elif command == "finetune":
                summary = jobs.finetune(run, address=args.address)
            else:
                summary = jobs.pipeline(run, address=args.address)
    except Preempted as e:
        print(f"{where}: {e}", file=sys.stderr)
        return e.exit_code
    except RuntimeError as e:  # a run that failed on its workers, said in one line
        print(f"{where}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    _print_summary(command, cfg, summary)
    return 0


def _runs(folder: str) -> int:
    from .runs import format_table, list_runs

    rows = list_runs(folder)
    print(format_table(rows, folder) if rows else f"no run directories under {folder}")
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
    from .report import make_report

    made = make_report(run_dirs, out)
    print(f"runs: {', '.join(made['runs'])}")
    for path in made["plots"]:
        print(f"plot: {path}")
    print(f"report: {made['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
