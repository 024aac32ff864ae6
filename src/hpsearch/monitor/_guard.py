"""`DashboardGuard`: the WSGI wrapper in front of optuna-dashboard's app, which has no authentication and can
delete studies.

- Bound to a loopback address, it answers only requests whose Host is that address with its port
  (`127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`): a web page the user opens cannot reach it by DNS
  rebinding (its requests carry the attacker's host name), 403 otherwise.
- A request that carries an `Origin` must come from the Host it names (403 otherwise): another site's page
  cannot send the dashboard a cross-site POST.
- With `--allow-remote`, every request also needs the start's token (401 without it): `?token=T` in the URL
  the command printed sets a cookie and redirects to the same page without it; afterwards the cookie, or an
  `Authorization: Bearer T` header, carries it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit
from wsgiref.simple_server import WSGIRequestHandler

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def url_host(host: str) -> str:
    """A bind address as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def token_cookie(port: int) -> str:
    # Cookies are shared by every port of a host: one name per port, so two dashboards keep their own.
    return f"hpsearch_dashboard_{port}"


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host headers a dashboard bound to loopback `host`:`port` answers (lower case)."""
    names = {*LOOPBACK_NAMES, url_host(host).lower()}
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:  # a browser leaves the default port out of Host
        hosts |= names
    return frozenset(hosts)


class DashboardGuard:
    """Wraps `app`: `hosts` are the Host headers it answers (None: any, for a non-loopback bind), `token` the
    start's token (None: none needed)."""

    def __init__(self, app: App, *, hosts: frozenset[str] | None, token: str | None, port: int) -> None:
        self.app, self.hosts, self.token, self.cookie = app, hosts, token, token_cookie(port)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST", "").strip().lower()
        if self.hosts is not None and host not in self.hosts:
            return _answer(start_response, "403 Forbidden",
                           f"hpsearch dashboard: Host {host or '(none)'!r} is not the address it is bound to; "
                           f"open http://{sorted(self.hosts)[0]}/\n")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and urlsplit(origin).netloc.lower() != host:
            return _answer(start_response, "403 Forbidden", "hpsearch dashboard: a request from another site\n")
        if self.token is None:
            return self.app(environ, start_response)
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        given = [value for key, value in query if key == "token"]
        if given:
            if not self._is_token(given[-1]):
                return self._unauthorized(start_response)
            # The token leaves the URL (history, Referer) for a cookie only this dashboard's pages send back.
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
            return _answer(start_response, "303 See Other", "", [
                ("Location", path + (f"?{rest}" if rest else "")),
                ("Set-Cookie", f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"),
            ])
        if self._is_token(self._cookie(environ)) or self._is_token(self._bearer(environ)):
            return self.app(environ, start_response)
        return self._unauthorized(start_response)

    def _is_token(self, value: str | None) -> bool:
        return value is not None and self.token is not None and secrets.compare_digest(value, self.token)

    def _cookie(self, environ: Environ) -> str | None:
        try:
            morsel = SimpleCookie(environ.get("HTTP_COOKIE", "")).get(self.cookie)
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    @staticmethod
    def _bearer(environ: Environ) -> str | None:
        scheme, _, value = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    @staticmethod
    def _unauthorized(start_response: StartResponse) -> Iterable[bytes]:
        return _answer(start_response, "401 Unauthorized",
                       "hpsearch dashboard: open it with the URL (?token=...) that `hpsearch dashboard` printed\n",
                       [("WWW-Authenticate", "Bearer")])


def _answer(start_response: StartResponse, status: str, text: str,
            headers: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                            *(headers or [])])
    return [body]


class RequestLog(WSGIRequestHandler):
    """bottle's wsgiref handler (no reverse DNS lookup per request), whose access log masks `?token=`: the
    token is printed once, in the URL, and not again in each request's log line."""

    def address_string(self) -> str:
        return str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:
        super().log_message("%s", re.sub(r"([?&]token=)[^&\s]*", r"\1***", format % args))
