"""`wsclip serve` as a child process: start it on a free port and wait until it is ready (benchmarks, tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from wsclip.errors import WsclipError


def start_server_process(args, ready_within: float = 120.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of `python -m wsclip.cli serve ARGS` (ARGS should include `--port 0`) once
    /health/ready answers 200. The caller stops the process; one that exits or is not ready within
    `ready_within` seconds is killed here and reported as a WsclipError with its stderr."""
    import httpx

    env = {**os.environ, "WSCLIP_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "wsclip.cli", "serve", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "listening on http://" not in line:
            raise WsclipError(f"wsclip serve did not start: {line}{proc.stderr.read()}")
        url = line.split("listening on ")[1].split()[0]
        t_end = time.monotonic() + ready_within
        while time.monotonic() < t_end and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise WsclipError(f"wsclip serve was not ready within {ready_within:g} s")
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
