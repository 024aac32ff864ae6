"""`redact(url)`: a storage URL without its password, for every line a user or a file sees.

Its own module: both the storage (`_storage`) and the proxy client (`_proxy`) redact, and neither imports the other.
"""

from __future__ import annotations

import re

# libpq also takes a password as a query parameter (`?password=...`, `sslpassword=...`).
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL without its password, for logs, error lines, tables and manifests, whether it parses or not.

    Read as text, not through SQLAlchemy's `make_url`: that ends the password at its FIRST `@`, so of
    `postgresql://u:p@ss@host/db` it hides `p` and shows `ss@host` as the host. Here the credentials run to the
    LAST `@` (a password may hold `@`, `:`, `/` or `?` unencoded; a user name may hold `@`): everything between
    the first `:` of the user part and that `@` is masked. An `@` after the host (in the query) masks more than
    the password, never less."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, slashes, rest = url.partition("://")
    if not slashes:  # no scheme (a mistyped URL): its user part, if any, starts the text
        scheme, rest = "", url
    if rest.startswith("/"):  # no host part (sqlite:///path, journal:///path)
        return url
    credentials, at, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    if not at or not colon:  # no user, or a user without a password
        return url
    return f"{scheme}{slashes}{user}:***@{host}"
