"""`wsclip serve` started as a real subprocess on 127.0.0.1 (port 0) for the tests that go through the CLI."""

import subprocess

from wsclip.serve.launch import start_server_process


def start_cli_server(*args: str, ready_within: float = 120.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `wsclip serve --port 0 --device cpu --log-level warning ARGS`, once ready.
    The caller stops the process; one that never gets ready fails the test (WsclipError)."""
    proc, url = start_server_process(["--port", "0", "--device", "cpu", "--log-level", "warning", *args], ready_within)
    assert url.startswith("http://127.0.0.1:"), url
    return proc, url
