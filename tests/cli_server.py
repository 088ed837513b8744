"""`wsclip serve` started as a real subprocess on 127.0.0.1 (port 0) for the tests that go through the CLI."""

import os
import subprocess
import sys
import time

import httpx


def start_cli_server(*args: str, ready_within: float = 120.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `wsclip serve --port 0 --device cpu --log-level warning ARGS`, once /health/ready
    answers 200. The caller stops the process; if it never gets ready it is killed here and the test fails."""
    env = {**os.environ, "WSCLIP_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "wsclip.cli", "serve", "--port", "0", "--device", "cpu",
                             "--log-level", "warning", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        t_end = time.monotonic() + ready_within
        while True:
            assert time.monotonic() < t_end and proc.poll() is None, "server never became ready"
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
