"""A server the tests or benchmarks start dies with the process that started it, even when that process
is killed by a timeout (scripts/comfy_server.py `_die_with_parent`); the demo's detached one does not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# A parent that starts a long-lived child in its own session as ComfyServer.start does, prints the child's
# pid, then is killed with SIGKILL (no finally, no atexit runs).
PARENT = """
import os, signal, subprocess, sys
sys.path.insert(0, {scripts!r})
from comfy_server import _die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=None if {detach} else _die_with_parent)
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _child_after_parent_killed(detach: bool) -> bool:
    code = PARENT.format(scripts=str(SCRIPTS), detach=detach)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    alive = _alive(pid)
    if alive:
        os.kill(pid, 9)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(120)
def test_a_server_dies_with_the_process_that_started_it():
    assert _child_after_parent_killed(detach=False) is False
    assert _child_after_parent_killed(detach=True) is True  # the check itself sees a live child
