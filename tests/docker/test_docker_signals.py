"""`docker stop` reaches every rank: the entrypoint forwards SIGTERM to the command's group.

A stand-in job shaped like `deepspeed`'s: a runner (bash, which dies of SIGTERM and
passes nothing on, as DeepSpeed's local runner does) starts a "rank" in the background
that, on SIGTERM, takes a moment to "checkpoint" and writes a file. The entrypoint is
started in a new session, as PID 1 of a container is (the session and group leader).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DOCKER = Path(__file__).resolve().parents[2] / "docker"

RANK = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1.0)  # the checkpoint takes a while; the runner is long gone by now
    out.write_text("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[2]).write_text("ready")
while True:
    time.sleep(0.05)
"""


def _start(tmp_path: Path, *command: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "PIPELINE_QUIET": "1"}
    return subprocess.Popen(
        ["bash", str(DOCKER / "entrypoint.sh"), *command],
        env=env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_reaches_the_ranks_and_the_container_waits_for_them(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    done, ready = tmp_path / "checkpointed", tmp_path / "ready"
    runner = f'"{sys.executable}" "{tmp_path / "rank.py"}" "{done}" "{ready}" & wait'
    proc = _start(tmp_path, "bash", "-c", runner)
    try:
        _wait_for(ready)
        proc.send_signal(signal.SIGTERM)  # what `docker stop` does to PID 1
        _, stderr = proc.communicate(timeout=30)
    finally:
        try:  # whatever is left of the job's group (nothing, when the test passes)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The rank heard it, and the entrypoint returned only after the rank was done.
    assert done.read_text() == "checkpointed", stderr
    assert "SIGTERM -> process group" in stderr
    assert proc.returncode == 128 + signal.SIGTERM  # the runner died of it


def test_without_a_signal_the_status_is_the_commands(tmp_path):
    proc = _start(tmp_path, "bash", "-c", "exit 3")
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    proc = _start(tmp_path, "no-such-command-here")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 127 and "cannot run no-such-command-here" in stderr
