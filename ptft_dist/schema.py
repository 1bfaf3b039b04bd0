"""The JSON Schema of each command's config: pydantic's, from the typed schema in ``config.py``.

Editors that speak JSON Schema (the YAML language server in VS Code, JetBrains IDEs, Neovim)
complete and check a config file against it: put
``# yaml-language-server: $schema=pretrain.schema.json`` at the top of the YAML, after
``ptft config schema pretrain --out pretrain.schema.json``. Every field carries its
documentation as ``description``; unknown keys are refused (``additionalProperties: false``),
as the loader refuses them. The loader stays the authority: it also checks what a schema
cannot say (batch divisibility, ranges that depend on other fields).
"""

from __future__ import annotations

from pydantic.json_schema import GenerateJsonSchema

from . import config as C

DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Schema(GenerateJsonSchema):
    """Pydantic's JSON Schema without the titles it makes up from field names ("Run Dir")."""

    def field_title_should_be_set(self, schema) -> bool:
        return False


def json_schema(command: str) -> dict:
    """The JSON Schema of the YAML config of ``command`` (data, pretrain, finetune, pipeline)."""
    if command not in C.COMMANDS:
        raise C.ConfigError(f"no config for command {command!r}; choose one of {', '.join(C.COMMANDS)}")
    schema = C.type_adapter(C.COMMANDS[command]).json_schema(schema_generator=_Schema)
    schema.pop("title", None)
    return {"$schema": DRAFT, "title": f"ptft {command} config", **schema}
