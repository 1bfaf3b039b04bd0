"""Where dataset files live: a local path or any fsspec URL (``http(s)://``, ``s3://``,
``gs://``...). Remote files are opened for ranged reads, never copied whole to local disk.

Callers pass dataset locations around as strings. ``pathlib.Path`` folds the double slash of a
URL (``Path("http://host/x")`` is ``http:/host/x``), so :func:`location` repairs that form:
a path built with ``Path(dataset_dir, "tokenizer")`` from a URL still names the URL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

from .errors import DataError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/+(.*)$")

#: Read size of remote files: one ranged request fetches this much ahead.
REMOTE_BLOCK_BYTES = 4 << 20


def location(path: str | os.PathLike) -> str:
    """A normalized location string: an absolute-or-relative local path, or a URL."""
    text = os.fspath(path)
    m = _SCHEME.match(text)
    if m and len(m.group(1)) > 1:  # one letter is a Windows drive, not a scheme
        scheme = m.group(1).lower()
        if scheme in ("file", "local"):
            return "/" + m.group(2).lstrip("/")
        return f"{scheme}://{m.group(2)}"
    return text


def is_remote(loc: str) -> bool:
    return "://" in loc


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local directory or a URL."""
    loc = location(base)
    if is_remote(loc):
        return loc.rstrip("/") + "/" + name
    return str(Path(loc, name))


def _fs(loc: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with the dependencies
        raise DataError(f"{loc}: reading URLs needs the `fsspec` package") from None
    try:
        fs, path = fsspec.core.url_to_fs(loc)
    except (ImportError, ValueError) as e:
        raise DataError(f"{loc}: cannot open this URL ({e}); install the fsspec backend for its scheme") from None
    return fs, path


def open_binary(loc: str) -> BinaryIO:
    """Open for reading with seeks. Raises FileNotFoundError when it does not exist."""
    if not is_remote(loc):
        return open(loc, "rb")
    fs, path = _fs(loc)
    try:
        return fs.open(path, "rb", block_size=REMOTE_BLOCK_BYTES, cache_type="readahead")
    except FileNotFoundError:
        raise
    except OSError as e:
        if "404" in str(e) or "Not Found" in str(e):
            raise FileNotFoundError(loc) from e
        raise


def read_bytes(loc: str) -> bytes:
    with open_binary(loc) as fh:
        return fh.read()


def exists(loc: str) -> bool:
    if not is_remote(loc):
        return os.path.isfile(loc)
    fs, path = _fs(loc)
    try:
        return bool(fs.exists(path))
    except OSError:
        return False


def size_bytes(fh: BinaryIO, loc: str) -> int | None:
    """Size of an open file, or None when the server does not say."""
    if not is_remote(loc):
        return os.fstat(fh.fileno()).st_size
    size = getattr(fh, "size", None)
    return int(size) if size is not None else None
