"""`redact(url)`: a storage URL without its password, for every line a user or a file sees.

Its own module: both the storage (`_storage`) and the proxy client (`_proxy`) redact, and neither imports the other.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


def redact(url: str) -> str:
    """The URL without its password, for logs, error lines, tables and manifests; also a URL that does not parse
    (its text between `user:` and the last `@` is masked)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is no number
        head, at, host = url.rpartition("@")
        if not at:
            return url
        scheme, slashes, credentials = head.rpartition("//")
        user, colon, _ = credentials.partition(":")
        return f"{scheme}{slashes}{user}{':***' if colon else ''}@{host}"
