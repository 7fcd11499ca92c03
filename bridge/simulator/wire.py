"""What the simulator says on the wire: paths, bodies, content types, ETags, queries, replies."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

V1 = "/computeMetadata/v1/"
CONTROL = "/simulator/v1/"
NO_NOTIFICATION = b'{"error":"no notifications have been received yet, try again later"}'
MISSING_FLAVOR = b"Missing Metadata-Flavor:Google header."
TEXT = "application/text"
JSON = "application/json"


def etag_of(data: bytes) -> str:
    """Content-derived, like Google's emulators: A -> B -> A gives the first ETag back."""
    return hashlib.sha256(data).hexdigest()[:16]


def metadata_key(path: str) -> str:
    """Accept ``instance/x``, ``/instance/x`` or ``/computeMetadata/v1/instance/x``."""
    key = path.lstrip("/").removeprefix(V1.lstrip("/"))
    if not key or key.endswith("/") or "//" in key:
        raise ValueError(f"not a metadata key: {path!r}")
    return key


def container_of(value: str) -> Any:
    """The parsed value if it is a JSON object or array (served as JSON), else None."""
    if not value.startswith(("{", "[")):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


def camel(name: str) -> str:
    first, *rest = name.split("-")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True)
class Query:
    alt: str | None = None
    recursive: bool = False
    wait: bool = False
    last_etag: str | None = None
    timeout: int | None = None

    @classmethod
    def parse(cls, query: str) -> Query:
        q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        alt = q.get("alt")
        if alt not in (None, "json", "text"):
            raise ValueError(f"unsupported alt={alt}")
        timeout = q.get("timeout_sec")
        if timeout is not None and not (timeout.isdigit() and int(timeout) > 0):
            raise ValueError("timeout_sec must be a positive integer")
        return cls(
            alt=alt,
            recursive=q.get("recursive", "").lower() == "true",
            wait=q.get("wait_for_change", "").lower() == "true",
            last_etag=q.get("last_etag"),
            timeout=None if timeout is None else int(timeout),
        )


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    ctype: str = TEXT
    etag: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
