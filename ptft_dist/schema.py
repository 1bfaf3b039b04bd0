"""The JSON Schema of each command's config, derived from the typed schema in ``config.py``.

Editors that speak JSON Schema (the YAML language server in VS Code, JetBrains IDEs, Neovim)
complete and check a config file against it: put
``# yaml-language-server: $schema=pretrain.schema.json`` at the top of the YAML, after
``ptft config schema pretrain --out pretrain.schema.json``. Every field carries its
documentation as ``description``; unknown keys are refused (``additionalProperties: false``),
as the loader refuses them. The loader stays the authority: it also checks what a schema
cannot say (batch divisibility, ranges that depend on other fields).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from . import config as C

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _type_schema(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in typing.get_args(tp)]
        return {"anyOf": options}
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    return {}  # Any: no constraint


def _default(fl: dataclasses.Field) -> Any:
    if fl.default is not dataclasses.MISSING:
        return fl.default
    if fl.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = fl.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value) or (isinstance(value, list) and any(map(dataclasses.is_dataclass, value))):
            return None  # a section's defaults are its fields' own
        return value
    return None


def _object_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    props = {}
    for fl in dataclasses.fields(cls):
        prop = _type_schema(hints[fl.name])
        doc = fl.metadata.get("doc", "")
        if doc:
            prop["description"] = doc
        default = _default(fl)
        if default is not None and not dataclasses.is_dataclass(hints[fl.name]):
            prop["default"] = default
        props[fl.name] = prop
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__:
        out["description"] = cls.__doc__.strip().split("\n\n")[0]
    return out


def json_schema(command: str) -> dict:
    """The JSON Schema of the YAML config of ``command`` (data, pretrain, finetune, pipeline)."""
    if command not in C.COMMANDS:
        raise C.ConfigError(f"no config for command {command!r}; choose one of {', '.join(C.COMMANDS)}")
    schema = _object_schema(C.COMMANDS[command])
    return {"$schema": DRAFT, "title": f"ptft {command} config", **schema}
