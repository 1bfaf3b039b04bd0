"""Secrets: which values and field names are secret, and copies of data with them replaced by ``***``.

Everything written or shown (config.yaml, checkpoints, --dry-run, summary.json, W&B, reports)
goes through :func:`redact`. Reads the environment only for the secret values to redact,
never to configure anything. Imports nothing of the package.
"""

from __future__ import annotations

import os
import re
from typing import Any

#: Environment variables whose values are secrets. Read only to redact them, never to
#: configure anything.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PTFT_MONGODB_PASSWORD")


def secret_values() -> tuple[str, ...]:
    """The secret strings of this environment (API keys and tokens), to redact by value."""
    return tuple(v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4)


#: Words that mark a field as secret when they are one of its name's parts
#: (``api_key``, ``hf_token``, ``db-password``; not ``tokenizer`` or ``num_tokens``).
SECRET_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"}
)
REDACTED = "***"
#: the password of a URI with credentials (``scheme://user:password@host``)
_URI_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@/\s]+@")


def is_secret_name(name: str) -> bool:
    parts = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return any(part in SECRET_WORDS for part in parts)


def redact(data: Any, values: tuple[str, ...] | list[str] = ()) -> Any:
    """A copy of ``data`` (dicts, lists, scalars) with secrets replaced by ``***``: the value of
    every field whose name is secret (:func:`is_secret_name`), and every occurrence of the
    strings in ``values`` (e.g. the W&B API key) anywhere else."""
    values = [v for v in values if v]

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (REDACTED if is_secret_name(k) and v not in (None, "") else scrub(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        if isinstance(value, str):
            for secret in values:
                value = value.replace(secret, REDACTED)
            value = _URI_PASSWORD.sub(rf"\1{REDACTED}@", value)  # mongodb://user:password@host
        return value

    return scrub(data)
