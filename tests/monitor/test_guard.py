"""`DashboardGuard` in process, on a stand-in app: which Host, Origin and token it lets through, and the request
log that masks the token. (tests/cli/test_cli.py sends the real `hpsearch dashboard` real HTTP requests.)"""

from __future__ import annotations

from typing import Any

import pytest

from hpsearch.monitor._guard import DashboardGuard, RequestLog, allowed_hosts, url_host

TOKEN = "t0ken-Abc_123"


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"studies"]


def _call(guard: DashboardGuard, host: str, path: str = "/api/studies", query: str = "",
          **headers: str) -> tuple[str, dict[str, str], bytes]:
    environ = {"HTTP_HOST": host, "PATH_INFO": path, "QUERY_STRING": query, "SCRIPT_NAME": ""}
    environ |= {f"HTTP_{k.upper()}": v for k, v in headers.items()}
    answered: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        answered.update(status=status, headers=dict(response_headers))

    body = b"".join(guard(environ, start_response))
    return answered["status"], answered["headers"], body


def test_loopback_hosts_are_the_bound_port_by_every_loopback_name() -> None:
    assert allowed_hosts("127.0.0.1", 8080) == {"127.0.0.1:8080", "localhost:8080", "[::1]:8080"}
    assert "[::1]:8080" in allowed_hosts("::1", 8080) and "127.0.0.2:8080" in allowed_hosts("127.0.0.2", 8080)
    assert "localhost" in allowed_hosts("127.0.0.1", 80) and "localhost" not in allowed_hosts("127.0.0.1", 8080)
    assert url_host("::1") == "[::1]" and url_host("0.0.0.0") == "0.0.0.0"


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:8080", "200 OK"), ("localhost:8080", "200 OK"), ("[::1]:8080", "200 OK"),
    ("attacker.example:8080", "403 Forbidden"), ("127.0.0.1:8081", "403 Forbidden"), ("", "403 Forbidden"),
    ("localhost", "403 Forbidden"),
])
def test_a_loopback_dashboard_answers_only_its_own_host(host: str, status: str) -> None:
    guard = DashboardGuard(_app, hosts=allowed_hosts("127.0.0.1", 8080), token=None, port=8080)
    answered, _, body = _call(guard, host)
    assert answered == status and (body == b"studies") == (status == "200 OK")


@pytest.mark.parametrize("origin, status", [
    ("http://127.0.0.1:8080", "200 OK"), ("http://attacker.example", "403 Forbidden"), ("null", "403 Forbidden"),
    ("http://localhost:8080", "403 Forbidden"),  # another origin than the Host it was sent to
])
def test_a_request_from_another_site_is_refused(origin: str, status: str) -> None:
    guard = DashboardGuard(_app, hosts=allowed_hosts("127.0.0.1", 8080), token=None, port=8080)
    assert _call(guard, "127.0.0.1:8080", origin=origin)[0] == status


def test_with_a_token_every_request_needs_it() -> None:
    guard = DashboardGuard(_app, hosts=None, token=TOKEN, port=8080)
    assert _call(guard, "gpu-box:8080")[0] == "401 Unauthorized"
    assert _call(guard, "gpu-box:8080", query="token=nope")[0] == "401 Unauthorized"
    assert _call(guard, "gpu-box:8080", cookie="hpsearch_dashboard_8080=nope; other=1")[0] == "401 Unauthorized"
    assert _call(guard, "gpu-box:8080", cookie="hpsearch_dashboard_9090=" + TOKEN)[0] == "401 Unauthorized"
    assert _call(guard, "gpu-box:8080", cookie='bad"cookie')[0] == "401 Unauthorized"

    status, headers, _ = _call(guard, "gpu-box:8080", path="/dashboard/studies/1", query=f"x=1&token={TOKEN}&y=")
    assert status == "303 See Other" and headers["Location"] == "/dashboard/studies/1?x=1&y="
    assert headers["Set-Cookie"] == f"hpsearch_dashboard_8080={TOKEN}; Path=/; HttpOnly; SameSite=Strict"
    assert _call(guard, "gpu-box:8080", cookie=f"other=1; hpsearch_dashboard_8080={TOKEN}")[2] == b"studies"
    assert _call(guard, "gpu-box:8080", authorization=f"Bearer {TOKEN}")[2] == b"studies"


def test_the_request_log_masks_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    handler = RequestLog.__new__(RequestLog)  # only its logging: no socket
    handler.client_address = ("127.0.0.1", 5555)
    handler.requestline = f"GET /dashboard?token={TOKEN}&x=1 HTTP/1.1"
    handler.log_request(303, 0)
    logged = capsys.readouterr().err
    assert TOKEN not in logged and "GET /dashboard?token=***&x=1 HTTP/1.1" in logged, logged
