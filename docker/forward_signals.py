#!/usr/bin/env python3
"""Run a command as the container's PID 1 and pass `docker stop`'s SIGTERM to every process it started.

    forward_signals.py COMMAND [ARG ...]

Why not `exec COMMAND`: `docker stop` signals PID 1 only. A PID 1 without a handler
ignores SIGTERM (the kernel protects a namespace's init), so `exec deepspeed ...` would
sit out the grace period and be SIGKILLed, ranks and all, with no checkpoint. And
DeepSpeed's runner, even when it does die of SIGTERM, does not pass it on: its launcher
and the ranks below it would never hear of it.

So this process starts COMMAND in its own process group and, on SIGTERM or SIGINT,
signals that whole group: the runner, DeepSpeed's per-node launcher and every rank, whose
trainer then checkpoints at the end of its step and stops. It waits until the group has
no process left (the runner may exit long before its ranks finish writing), reaps the
orphans that land on PID 1, and exits with COMMAND's status (128+N if a signal N ended
it). Daemons that left the group (the sshd of start_sshd.sh) do not hold the container
open. Without a signal it ends when COMMAND ends, as `exec` would.

The group is a new one only where that is safe: as PID 1, or when this process already
leads its group, a terminal keeps its foreground group (Ctrl-C, job control) as it was.

Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.2


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` other than this one (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces or ')', so split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def reap() -> None:
    """Collect exited orphans (PID 1 inherits them) so they do not linger as zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if not argv:
        print("forward_signals.py: error: no command given", file=sys.stderr)
        return 2
    # PID 1 leads its own group (runc makes it a session leader); so does a process that a
    # test or a supervisor started with a new session. Anywhere else, keep the caller's
    # group and signal only COMMAND's own group, which COMMAND then gets to itself.
    leads_group = os.getpgrp() == os.getpid()
    try:
        child = subprocess.Popen(argv, process_group=None if leads_group else 0)
    except OSError as err:
        print(f"forward_signals.py: error: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
        return 127
    pgid = os.getpgrp() if leads_group else child.pid
    signalled = False

    def forward(signum: int, frame) -> None:  # noqa: ARG001
        nonlocal signalled
        signalled = True
        if signum == signal.SIGINT and leads_group and os.isatty(0):
            return  # Ctrl-C: the terminal already sent it to the whole (foreground) group
        print(f"forward_signals.py: {signal.Signals(signum).name} -> process group {pgid}",
              file=sys.stderr, flush=True)
        # Ignored while sending, so this process's own share of the group signal is dropped
        # by the kernel instead of re-entering this handler.
        signal.signal(signum, signal.SIG_IGN)
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
        finally:
            signal.signal(signum, forward)

    for sig in FORWARDED:
        signal.signal(sig, forward)

    status = child.wait()
    # After a forwarded signal the ranks may outlive the runner by a checkpoint's time.
    while signalled and group_members(pgid):
        reap()
        time.sleep(POLL_S)
    reap()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
