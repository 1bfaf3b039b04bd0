"""Generate docs/config.md from the config schema, so the reference never drifts.

python -m ptft_dist.docgen > docs/config.md
"""

from __future__ import annotations

import sys

from . import config as C

HEADER = """# Config reference

Generated from `ptft_dist/config.py` by `python -m ptft_dist.docgen > docs/config.md`; a test
fails when this file and the schema disagree. Every command takes `--config FILE|PRESET` and
dotted overrides (`optim.lr=3e-4 zero.stage=3`, `finetune.0.optim.lr=1e-4` in a pipeline's
list of jobs); pydantic validates them against these types, and unknown keys and wrong types
(`2.0` for an integer, `1` for true/false) are errors that name the field and the value.
`ptft <command> --dry-run` prints the resolved config, the batch arithmetic and the derived
DeepSpeed JSON; `ptft config schema <command>` writes the JSON Schema (these descriptions) for
editors that complete and check YAML.

Batch arithmetic: `global_batch_size = micro_batch_size_per_rank x gradient accumulation x
num_workers`; the accumulation is derived, and a global batch that is not a multiple of
`micro_batch_size_per_rank x num_workers` is refused.

Shipped presets (`ptft presets`): {presets}.
"""

TITLES = {
    "data": "`ptft data build`",
    "pretrain": "`ptft pretrain`",
    "finetune": "`ptft finetune`",
    "pipeline": "`ptft pipeline` (the `pretrain` and `finetune` sections are the two commands' configs)",
}


def _fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value}`"


def render() -> str:
    out = [HEADER.format(presets=", ".join(f"`{p}`" for p in C.list_presets()))]
    for command, cls in C.COMMANDS.items():
        out.append(
            f"\n## {TITLES[command]}\n\nDefault preset: `{C.DEFAULT_PRESETS[command]}`. {(cls.__doc__ or '').strip()}\n"
        )
        rows = C.field_docs(cls)
        if command == "pipeline":
            out.append(
                "Fields: `data.*` (as in `ptft data build`), `pretrain.*` (as in `ptft pretrain`), `finetune.*` (as in "
                "`ptft finetune`), and the pipeline's own:\n"
            )
            rows = [r for r in rows if not r[0].startswith(("data.", "pretrain.")) and r[0] != "finetune"]
        out.append("| field | type | default | meaning |\n| --- | --- | --- | --- |")
        for name, type_name, default, doc in rows:
            out.append(f"| `{name}` | {type_name.replace('|', '/')} | {_fmt(default)} | {doc.replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
