"""A training job started in a separate process (the Launch Train Job node): the command for one rank
or N ranks under torch.distributed.run, the progress events the job prints, and the supervision of
the process (its events, its last lines of output, a stop request, its death).

The job prints its progress as JSON lines after EVENT_PREFIX on its standard output (scripts/
train_job.py --events). The child is the pack's own script, but what it prints is read bounded and
checked: a line longer than MAX_LINE is cut, an event with unknown or wrong fields is ignored, and
only the last TAIL_LINES lines of other output are kept (for the error shown when the job dies).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EVENT_PREFIX = "@lora_foundry.event "
MAX_LINE = 4096  # bytes of one output line kept (the rest of a longer line is dropped)
TAIL_LINES = 20  # lines of output quoted when a job fails
TAIL_CHARS = 300  # characters of each quoted line
STOPPED_EXIT = 3  # the job's exit status when it stopped on request (after saving its checkpoint)
STOP_GRACE_S = 120.0  # how long a stopped job may take to save and exit before it is killed

# event kind -> {field: type}; every listed field is required, no other field is accepted
EVENTS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "start": {"name": str, "ranks": int, "images": int},
    "step": {"step": int, "total": int, "loss": float, "lr": float, "eta_s": float, "allreduce_s": float},
    "done": {"path": str, "step": int},
}


def encode_event(kind: str, **fields) -> str:
    """One event as the job prints it (one line, no newline)."""
    return EVENT_PREFIX + json.dumps({"event": kind, **fields}, allow_nan=False, separators=(",", ":"))


def parse_event(line: str) -> dict | None:
    """The event on a line the job printed, or None when the line is no event or a malformed one."""
    if not line.startswith(EVENT_PREFIX) or len(line) > MAX_LINE:
        return None
    try:
        data = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("event") not in EVENTS:
        return None
    spec = EVENTS[data["event"]]
    if set(data) != {"event", *spec}:
        return None
    for name, kind in spec.items():
        value = data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[name] = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, int) and not 0 <= value < 2**53:
            return None
        if isinstance(value, str) and len(value) > 1024:
            return None
    return data


@dataclass(frozen=True)
class Devices:
    """Where the job runs: the CPU with ``ranks`` processes, or one rank per listed CUDA device."""

    cuda: tuple[str, ...]  # CUDA device indices; empty: the CPU
    ranks: int

    @property
    def cpu(self) -> bool:
        return not self.cuda


def parse_devices(text: str, cpu_ranks: int = 1) -> Devices:
    """ "cpu" (``cpu_ranks`` processes) or comma-separated CUDA indices like "0,1" (one rank each)."""
    cleaned = text.strip().lower()
    if cleaned in ("", "cpu"):
        if not 1 <= cpu_ranks <= 64:
            raise ValueError(f"`processes` should be between 1 and 64, not {cpu_ranks}")
        return Devices((), cpu_ranks)
    parts = [p.strip() for p in cleaned.split(",")]
    if not all(p.isdigit() and len(p) <= 3 for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"`devices` {text[:40]!r} should be 'cpu' or distinct GPU numbers separated by commas, e.g. '0' or '0,1'"
        )
    return Devices(tuple(str(int(p)) for p in parts), len(parts))


def job_command(python: str, script: str | Path, job: str | Path, devices: Devices,
                extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The command line: the script on one process, or under torch.distributed.run for N ranks."""
    args = [str(script), str(job), "--events", *extra, *(["--cpu"] if devices.cpu else [])]
    if devices.ranks == 1:
        return [python, *args]
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(devices.ranks),
        *args,
    ]


def job_environment(base: dict[str, str], devices: Devices, cpu_threads: int = 0) -> dict[str, str]:
    """The job's environment: the listed GPUs only (none for the CPU), threads per rank on the CPU."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices.cuda)
    env["PYTHONUNBUFFERED"] = "1"
    if devices.cpu:
        threads = cpu_threads or max(1, (os.cpu_count() or 1) // devices.ranks)
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class JobFailedError(RuntimeError):
    """The job process ended with an error: its exit and its last lines of output."""


class JobProcess:
    """A running job: its events (a queue filled by a reader thread), its last lines of output, a
    stop request (SIGINT to its whole process group: every rank saves and exits; killed after
    STOP_GRACE_S) and its end."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None):
        self.argv = list(argv)
        self.events: queue.Queue[dict] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="lora_foundry job output", daemon=True)
        self._reader.start()
        self.stop_requested = False

    def _read(self) -> None:
        stream = self.process.stdout
        while True:
            raw = stream.readline(MAX_LINE)
            if not raw:
                break
            if not raw.endswith(b"\n"):  # a longer line: drop the rest of it
                while raw and not raw.endswith(b"\n"):
                    raw = stream.readline(MAX_LINE)
                self.tail.append("(a line too long to show)")
                continue
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            event = parse_event(line)
            if event is not None:
                self.events.put(event)
            elif line.strip():
                self.tail.append(line[:TAIL_CHARS])
        stream.close()

    def next_events(self, wait_s: float) -> list[dict]:
        """The events printed since the last call (waiting up to wait_s for the first one)."""
        out = []
        try:
            out.append(self.events.get(timeout=wait_s))
            while True:
                out.append(self.events.get_nowait())
        except queue.Empty:
            return out

    def running(self) -> bool:
        return self.process.poll() is None

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """Asks every process of the job to stop (each rank saves its last step), waits, kills after
        ``grace_s``. Returns the exit status."""
        self.stop_requested = True
        self._signal(signal.SIGINT)
        try:
            return self.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait(30)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        # ranks under torch.distributed.run are in the same group: none may outlive the launcher
        self._signal(signal.SIGKILL)
        return code

    def failure(self, code: int) -> JobFailedError:
        """The error for a job that ended with ``code`` (a negative code: killed by that signal)."""
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if -code == signal.SIGKILL:
                how += " (out of memory, or killed from outside)"
        else:
            how = f"exited with status {code}"
        lines = "\n".join(self.tail) or "(it printed nothing)"
        return JobFailedError(f"the training job {how}. Its last lines of output:\n{lines}")


def wait_for_exit(job: JobProcess, poll_s: float = 0.2, deadline_s: float | None = None) -> int:
    """Waits for the job's end (tests and scripts; the node polls itself)."""
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while job.running():
        if end is not None and time.monotonic() > end:
            raise TimeoutError("the job did not end in time")
        time.sleep(poll_s)
    return job.wait(30)
