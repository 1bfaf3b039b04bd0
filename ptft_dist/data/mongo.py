"""MongoDB as a data source, through the standard `pymongo` client.

A location is ``mongodb://[user:password@]host[:port][,host...]/db.collection[?options]`` (or
``mongodb+srv://``): the path names the database and the collection (split at the first dot;
database names cannot hold one). Credentials come from the URI or, when it has none, from the
environment variables ``PTFT_MONGODB_USERNAME`` / ``PTFT_MONGODB_PASSWORD``; they are never
logged, never put in a message and never written to a manifest: every location shown goes
through :func:`public_uri`.

Reading uses only what every MongoDB server supports: ``find`` with a filter, projection, sort
and batch size, ``count_documents``, and ``$bucketAuto`` on ``_id`` to cut a collection into
``_id`` ranges that several readers can read apart (:func:`split_ranges`). Documents come in
``_id`` order unless a sort is given, so a build is reproducible while the collection does not
change. Errors raise :class:`DataError` naming the location (without the password), the
collection and, for a bad document, its ``_id``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import DataError

log = logging.getLogger(__name__)

SCHEMES = ("mongodb://", "mongodb+srv://")
USER_ENV, PASSWORD_ENV = "PTFT_MONGODB_USERNAME", "PTFT_MONGODB_PASSWORD"
#: how long a client waits for a reachable server before the build gives up
DEFAULT_TIMEOUT_MS = 5000


def is_mongo(location: str) -> bool:
    return str(location).startswith(SCHEMES)


def public_uri(uri: str) -> str:
    """The URI with its password replaced by ``***`` (safe to log, show and record)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    creds, hosts = parts.netloc.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}" if ":" in creds else f"{user}@{hosts}"))


def _bson_json(value: Any) -> Any:
    """A BSON value (ObjectId, datetime...) as plain JSON data (MongoDB extended JSON)."""
    from bson import json_util

    return json.loads(json_util.dumps(value))


def parse_document(value: str | dict | None, what: str) -> dict | None:
    """A query document from a mapping or JSON text; MongoDB extended JSON (``{"$oid": ...}``,
    ``{"$date": ...}``) becomes the BSON value."""
    if not value:
        return None
    from bson import json_util

    try:
        parsed = json_util.loads(value if isinstance(value, str) else json.dumps(value))
    except (ValueError, TypeError) as e:
        raise DataError(f"{what} is not a JSON document ({e}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise DataError(f"{what} must be a mapping, got {value!r}")
    return parsed


@dataclass
class Collection:
    """One collection to read: where, which documents (filter, ``_id`` range), in what order."""

    uri: str
    database: str
    collection: str
    filter: dict = field(default_factory=dict)
    projection: dict | None = None
    sort: list = field(default_factory=lambda: [("_id", 1)])
    batch_size: int = 1000
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    #: [low, high): an ``_id`` range of the collection (None: unbounded on that side)
    id_low: Any = None
    id_high: Any = None

    @property
    def public(self) -> str:
        return public_uri(self.uri)

    @property
    def where(self) -> str:
        return f"{self.public} (collection {self.database}.{self.collection})"

    def query(self) -> dict:
        bounds = {}
        if self.id_low is not None:
            bounds["$gte"] = self.id_low
        if self.id_high is not None:
            bounds["$lt"] = self.id_high
        if not bounds:
            return dict(self.filter)
        if not self.filter:
            return {"_id": bounds}
        return {"$and": [self.filter, {"_id": bounds}]}

    def manifest_entry(self) -> dict:
        """What was asked for, without secrets (the manifest adds what was read)."""
        entry = {"uri": self.public, "database": self.database, "collection": self.collection}
        entry["filter"] = _bson_json(self.filter)
        if self.projection:
            entry["projection"] = _bson_json(self.projection)
        entry["sort"] = [list(s) for s in self.sort]
        return entry


def parse(
    location: str,
    *,
    filter: str | dict | None = None,
    projection: str | dict | None = None,
    sort: str | dict | None = None,
    batch_size: int = 1000,
    timeout_ms: int = DEFAULT_TIMEOUT_MS,
) -> Collection:
    """A :class:`Collection` from a ``mongodb://.../db.collection`` location (no connection yet).

    ``filter`` and ``projection`` are JSON documents; ``sort`` is a JSON object of field ->
    1 or -1 (in its order), with ``_id`` added last so that the order is total."""
    uri = str(location)
    shown = public_uri(uri)
    parts = urlsplit(uri)
    path = parts.path.lstrip("/")
    db, _, coll = path.partition(".")
    if not db or not coll:
        raise DataError(f"{shown}: name the collection as mongodb://host:port/<database>.<collection>")
    spec = Collection(uri, db, coll, batch_size=batch_size, timeout_ms=timeout_ms)
    spec.filter = parse_document(filter, f"data.mongo.filter for {shown}") or {}
    spec.projection = parse_document(projection, f"data.mongo.projection for {shown}")
    order = parse_document(sort, f"data.mongo.sort for {shown}")
    if order:
        for key, direction in order.items():
            if direction not in (1, -1):
                raise DataError(f"data.mongo.sort for {shown}: {key!r} must be 1 or -1, got {direction!r}")
        spec.sort = list(order.items()) + ([] if "_id" in order else [("_id", 1)])
    return spec


def from_settings(location: str, settings=None, fields: tuple[str, ...] = ()) -> Collection:
    """A :class:`Collection` read as a ``data.mongo`` / ``task.mongo`` section says (filter,
    projection, sort, batch size, timeout; None: the defaults). Without a projection only
    ``fields`` (and ``_id``) are fetched, when ``fields`` are given."""
    kw = {}
    if settings is not None:
        kw = dict(
            filter=settings.filter,
            projection=settings.projection,
            sort=settings.sort,
            batch_size=settings.batch_size,
            timeout_ms=settings.timeout_ms,
        )
    spec = parse(location, **kw)
    if spec.projection is None and fields:
        spec.projection = {name: 1 for name in dict.fromkeys(fields)}
    return spec


def client(spec: Collection):
    """A connected ``pymongo.MongoClient`` (checked with a ping); DataError when unreachable."""
    try:
        import pymongo
        from pymongo import errors
    except ImportError:  # pragma: no cover - pymongo is a dependency
        raise DataError(f"{spec.public}: reading MongoDB needs the `pymongo` package") from None
    parts = urlsplit(spec.uri)
    client_uri = urlunsplit(parts._replace(path=f"/{spec.database}"))
    kwargs: dict = {"serverSelectionTimeoutMS": spec.timeout_ms, "connectTimeoutMS": spec.timeout_ms}
    if "@" not in parts.netloc and os.environ.get(USER_ENV):
        kwargs.update(username=os.environ[USER_ENV], password=os.environ.get(PASSWORD_ENV, ""))
    try:
        c = pymongo.MongoClient(client_uri, **kwargs)
        c[spec.database].command("ping")
    except errors.OperationFailure as e:
        if e.code == 18 or "auth" in str(e).lower():
            raise DataError(f"{spec.where}: login failed ({_clean(e, spec)})") from None
        raise DataError(f"{spec.where}: the server refused the connection ({_clean(e, spec)})") from None
    except errors.ConfigurationError as e:
        raise DataError(f"{spec.public}: not a usable MongoDB URI ({_clean(e, spec)})") from None
    except errors.PyMongoError as e:
        raise DataError(f"{spec.where}: cannot connect ({type(e).__name__}: {_clean(e, spec)})") from None
    except (KeyError, ValueError) as e:  # a server that answers the login handshake oddly
        raise DataError(f"{spec.where}: login failed (the server's handshake: {type(e).__name__} {e})") from None
    return c


def _clean(error: Exception, spec: Collection) -> str:
    """An error's text, cut to one line, with the password (if any) removed."""
    text = str(error).split("\n")[0][:300]
    password = urlsplit(spec.uri).password or os.environ.get(PASSWORD_ENV)
    return text.replace(password, "***") if password else text


def open_collection(spec: Collection):
    """The pymongo collection object, checked to exist (a typo must not read 0 documents)."""
    c = client(spec)
    from pymongo import errors

    try:
        names = c[spec.database].list_collection_names()
    except errors.PyMongoError as e:
        raise DataError(f"{spec.where}: cannot list the collections ({_clean(e, spec)})") from None
    if spec.collection not in names:
        have = ", ".join(sorted(names)[:20]) or "none"
        raise DataError(
            f"{spec.public}: database {spec.database!r} has no collection {spec.collection!r} (it has: {have})"
        )
    return c[spec.database][spec.collection]


def describe(spec: Collection) -> dict:
    """Count and ``_id`` range of the documents the filter selects (for the manifest)."""
    coll = open_collection(spec)
    from pymongo import errors

    try:
        query = spec.query()
        count = coll.count_documents(query)
        first = list(coll.find(query, {"_id": 1}).sort("_id", 1).limit(1))
        last = list(coll.find(query, {"_id": 1}).sort("_id", -1).limit(1))
    except errors.PyMongoError as e:
        raise DataError(f"{spec.where}: cannot count the documents ({_clean(e, spec)})") from None
    finally:
        coll.database.client.close()
    return {
        "count": count,
        "id_min": _bson_json(first[0]["_id"]) if first else None,
        "id_max": _bson_json(last[0]["_id"]) if last else None,
    }


def split_ranges(spec: Collection, n: int) -> list[Collection]:
    """The collection cut into at most ``n`` ``_id`` ranges of about equal document counts
    (``$bucketAuto``), as Collections that read apart and together read every document once."""
    import dataclasses

    if n <= 1:
        return [spec]
    coll = open_collection(spec)
    from pymongo import errors

    try:
        pipeline = [{"$match": spec.query()}, {"$bucketAuto": {"groupBy": "$_id", "buckets": n}}]
        buckets = list(coll.aggregate(pipeline))
    except errors.PyMongoError as e:
        raise DataError(f"{spec.where}: cannot cut the collection into _id ranges ({_clean(e, spec)})") from None
    finally:
        coll.database.client.close()
    # Bounds from the buckets' minimums only: servers differ on whether a bucket's max is inclusive.
    lows = [b["_id"]["min"] for b in buckets]
    out = []
    for i, low in enumerate(lows):
        high = lows[i + 1] if i + 1 < len(lows) else spec.id_high
        out.append(dataclasses.replace(spec, id_low=low if i else spec.id_low, id_high=high))
    return out or [spec]


def _field(document: dict, name: str) -> Any:
    """``document[name]``, with ``a.b`` reaching into sub-documents; KeyError when absent."""
    value: Any = document
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def iter_documents(spec: Collection, projection_fields: tuple[str, ...] = ()) -> Iterator[dict]:
    """The selected documents, in the spec's order, ``batch_size`` per round trip."""
    coll = open_collection(spec)
    from pymongo import errors

    projection = spec.projection
    if projection is None and projection_fields:
        projection = {name: 1 for name in projection_fields}
    last_id = None
    try:
        cursor = coll.find(spec.query(), projection, sort=spec.sort, batch_size=spec.batch_size)
        for document in cursor:
            last_id = document.get("_id")
            yield document
    except errors.PyMongoError as e:
        after = f" after _id {last_id!r}" if last_id is not None else ""
        raise DataError(f"{spec.where}: reading failed{after} ({type(e).__name__}: {_clean(e, spec)})") from None
    finally:
        coll.database.client.close()


def text_of(spec: Collection, document: dict, name: str, what: str = "data.text_field") -> str:
    """The string in field ``name``; DataError naming the location, collection and ``_id``."""
    try:
        value = _field(document, name)
    except KeyError:
        have = ", ".join(repr(k) for k in document if k != "_id")
        fields = f" (fields: {have})" if have else ""
        raise DataError(
            f"{spec.where}: document _id={document.get('_id')!r} has no field {name!r}{fields}; set {what}"
        ) from None
    if not isinstance(value, str):
        raise DataError(
            f"{spec.where}: document _id={document.get('_id')!r}: field {name!r} is {type(value).__name__}, not text"
        )
    return value


def write_documents(location: str, documents: list[dict], *, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> int:
    """Insert ``documents`` into the collection a location names (created when missing).
    Refuses a collection that already holds documents: nothing is overwritten."""
    spec = parse(location, timeout_ms=timeout_ms)
    c = client(spec)
    from pymongo import errors

    try:
        coll = c[spec.database][spec.collection]
        if coll.count_documents({}, limit=1):
            raise DataError(f"{spec.where} already holds documents; write the predictions to a new collection")
        for lo in range(0, len(documents), 1000):
            coll.insert_many(documents[lo : lo + 1000], ordered=True)
    except errors.PyMongoError as e:
        raise DataError(f"{spec.where}: writing failed ({type(e).__name__}: {_clean(e, spec)})") from None
    finally:
        c.close()
    log.info("wrote %d documents to %s", len(documents), spec.where)
    return len(documents)
