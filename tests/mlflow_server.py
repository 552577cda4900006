"""Start and stop a real `mlflow server` for tests (sqlite backend, proxied artifacts in a temp dir).

Test modules use the module-scoped fixture: `from tests.mlflow_server import mlflow_server`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

STARTUP_TIMEOUT_S = 90.0  # ~7 s idle, ~20 s seen on 2 busy cores


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log_path: Path, n_chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-n_chars:]
    except OSError:
        return "<no server log>"


def start_server(tmp_dir: str | Path, timeout_s: float = STARTUP_TIMEOUT_S
                 ) -> tuple[str, subprocess.Popen]:
    """Launch `mlflow server` on a free 127.0.0.1 port and wait until /health answers.

    The server runs in its own process group (stop it with stop_server). Raises RuntimeError
    with the tail of the server's log if it exits or does not answer within timeout_s."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The background job runner (huey workers) is not needed for tracking; without it the
    # server starts faster and leaves no /dev/shm queue directory behind when killed.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    last_error = ""
    for attempt in range(3):  # the free port can be taken between probing and binding
        port = _free_port()
        uri = f"http://127.0.0.1:{port}"
        log_path = tmp_dir / f"server-{port}.log"
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_dir / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=tmp_dir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(uri):
                return uri, proc
            time.sleep(0.25)
        stop_server(proc)
        last_error = (f"mlflow server on port {port} "
                      f"{'exited with ' + str(proc.returncode) if proc.poll() is not None else 'timed out'}"
                      f" (attempt {attempt + 1}); log tail:\n{_log_tail(log_path)}")
        if "address already in use" not in _log_tail(log_path).lower():
            break
    raise RuntimeError(last_error)


def stop_server(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop the server's process group (CLI + uvicorn worker): SIGTERM, then SIGKILL leftovers."""
    _signal_group(proc.pid, signal.SIGTERM)  # start_new_session=True: the group id is the pid
    try:
        proc.wait(timeout=timeout_s)  # the CLI forwards SIGTERM to uvicorn and waits for it
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)  # anything still in the group
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A live tracking server for one test module; yields its URI."""
    uri, proc = start_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield uri
    finally:
        stop_server(proc)
