"""The job launcher's parts without ComfyUI (lora_core/train/launch.py): event lines are checked and
bounded, devices parse to ranks, the command is one process or torch.distributed.run, and a child
process's end (killed, failed, stopped) is reported with its last lines, never a hang."""

from __future__ import annotations

import signal
import sys
import textwrap

import pytest

from lora_foundry.lora_core.train import launch
from lora_foundry.lora_core.train.launch import (
    EVENT_PREFIX,
    JobProcess,
    encode_event,
    job_command,
    job_environment,
    parse_devices,
    parse_event,
    wait_for_exit,
)

STEP = dict(step=3, total=10, loss=0.25, lr=1e-4, eta_s=12.0, allreduce_s=0.01)


def test_an_event_survives_encoding_and_parsing():
    assert parse_event(encode_event("step", **STEP)) == {"event": "step", **STEP}
    assert parse_event(encode_event("done", path="/x/a.safetensors", step=4))["path"] == "/x/a.safetensors"
    # ints are accepted where floats are expected
    assert parse_event(
        EVENT_PREFIX + '{"event":"step","step":1,"total":2,"loss":1,"lr":0,"eta_s":0,"allreduce_s":0}'
    )


@pytest.mark.parametrize(
    "line",
    [
        "step 3/10 loss 0.25",  # a human line
        EVENT_PREFIX + "{not json",
        EVENT_PREFIX + "[1, 2]",
        EVENT_PREFIX + '{"event": "unknown"}',
        encode_event("step", **{**STEP, "extra": 1}),
        encode_event("done", path="a"),  # a field missing
        encode_event("step", **{**STEP, "step": "3"}),
        encode_event("step", **{**STEP, "step": True}),
        encode_event("step", **{**STEP, "step": -1}),
        EVENT_PREFIX + '{"event":"step","step":1,"total":2,"loss":NaN,"lr":0,"eta_s":0,"allreduce_s":0}',
        encode_event("done", path="a" * 2000, step=1),
        encode_event("done", path="a", step=1) + " " * launch.MAX_LINE,
    ],
)
def test_malformed_events_are_ignored(line):
    assert parse_event(line) is None


def test_devices():
    assert parse_devices("cpu") == launch.Devices((), 1)
    assert parse_devices(" CPU ", 3).ranks == 3
    gpus = parse_devices("0, 2")
    assert gpus.cuda == ("0", "2") and gpus.ranks == 2 and not gpus.cpu
    for bad in ("gpu", "0,0", "-1", "0;1", "1,a"):
        with pytest.raises(ValueError, match="`devices`"):
            parse_devices(bad)
    with pytest.raises(ValueError, match="`processes`"):
        parse_devices("cpu", 0)


def test_command_and_environment():
    one = job_command("py", "s.py", "j.json", parse_devices("cpu"), ["--comfyui", "c"])
    assert one == ["py", "s.py", "j.json", "--events", "--comfyui", "c", "--cpu"]
    two = job_command("py", "s.py", "j.json", parse_devices("0,1"))
    assert two[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert "--cpu" not in two
    env = job_environment({"A": "1", "CUDA_VISIBLE_DEVICES": "5"}, parse_devices("cpu", 2), 3)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "3" and env["A"] == "1"
    assert job_environment({}, parse_devices("1,3"))["CUDA_VISIBLE_DEVICES"] == "1,3"


def child(code: str) -> JobProcess:
    return JobProcess([sys.executable, "-c", textwrap.dedent(code)], env={"PYTHONUNBUFFERED": "1"})


def test_events_and_output_are_separated_and_bounded():
    job = child(f"""
        import sys
        print({encode_event("step", **STEP)!r})
        print("x" * 100000)
        for i in range(50):
            print("line", i)
        print({EVENT_PREFIX!r} + "garbage")
        sys.exit(4)
    """)
    code = wait_for_exit(job, deadline_s=60)
    assert code == 4
    assert job.next_events(0) == [{"event": "step", **STEP}]
    tail = list(job.tail)
    assert len(tail) == launch.TAIL_LINES and tail[-2] == "line 49"
    assert tail[-1].startswith(EVENT_PREFIX)  # a malformed event is shown as output
    error = str(job.failure(code))
    assert "exited with status 4" in error and "line 49" in error and "x" * 400 not in error


def test_a_killed_child_is_reported_with_the_signal():
    job = child("""
        import os, signal, sys
        print("loading the model", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    code = wait_for_exit(job, deadline_s=60)
    assert code == -signal.SIGKILL
    error = str(job.failure(code))
    assert (
        "killed by SIGKILL (out of memory, or killed from outside)" in error and "loading the model" in error
    )


def test_stop_asks_with_sigint_then_kills_after_the_grace():
    polite = child("""
        import signal, sys, time
        def on_int(sig, frame):
            print("saving", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGINT, on_int)
        print("ready", flush=True)
        time.sleep(60)
    """)
    while not polite.tail:
        polite.next_events(0.05)
    assert polite.stop(grace_s=30) == 3 and "saving" in polite.tail
    stubborn = child("""
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    while not stubborn.tail:
        stubborn.next_events(0.05)
    assert stubborn.stop(grace_s=0.5) == -signal.SIGKILL
