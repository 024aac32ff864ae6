"""`grpc://` storages and `hpsearch storage-proxy`: their refusals in one line. A real study through a real proxy
restarted midway is in tests/process/test_storage_proxy.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hpsearch.cli._main import main
from hpsearch.store import _proxy as proxy_module
from hpsearch.store._storage import StorageError, open_storage


def test_a_proxy_url_nobody_answers_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT_S", 0.5)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StorageError) as raised:
        open_storage(f"grpc://127.0.0.1:{port}")
    message = str(raised.value)
    assert f"grpc://127.0.0.1:{port}" in message and "hpsearch storage-proxy" in message and "\n" not in message


@pytest.mark.parametrize(("url", "named"), [("grpc://db-host:port", "port 'port'"), ("grpc://:13000", "grpc://HOST"),
                                            ("grpc://user:secret@db-host:13000", "grpc://HOST")])
def test_a_malformed_proxy_url_is_refused(url: str, named: str) -> None:
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    assert named in str(raised.value) and "secret" not in str(raised.value)


def test_storage_proxy_refuses_a_public_address_a_journal_and_a_busy_port(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["storage-proxy", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["storage-proxy", "--storage", f"journal:///{tmp_path / 's.log'}"]) == 2
    assert "cannot serve a journal file" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["storage-proxy", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
