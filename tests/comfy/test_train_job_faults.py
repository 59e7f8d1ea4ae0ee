"""Faults in a data-parallel job (2 gloo ranks on the CPU, scripts/train_job.py under
torch.distributed.run): a non-finite loss or a rank that dies stops every rank with one clear error,
no rank leaves a partial file, and the last good checkpoint stays loadable and resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
from job_run import COMPACT, SETTINGS, script_args
from train_run import DATASET_ARGS, TRAIN_ARGS

from lora_foundry.lora_core.train.state import read_state
from lora_foundry.nodes.train_job import ExportTrainJob

pytestmark = pytest.mark.first_leg  # scripts/run_tests.sh runs these on the first leg (tests/conftest.py)


@pytest.fixture(autouse=True)
def checkpoint(compact_sd15):
    """The compact SD1.5 checkpoint, linked into the base's models/checkpoints."""
    return compact_sd15


def export(name: str, **changes) -> Path:
    settings = {**TRAIN_ARGS, **SETTINGS, "output_name": name, **changes}
    return Path(
        ExportTrainJob().execute(COMPACT, **{**DATASET_ARGS, "folder": "train_set"}, **settings)["result"][0]
    )


def two_ranks(job: Path, base: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *script_args(job, base)]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_two_ranks(job: Path, base: Path) -> subprocess.CompletedProcess:
    return subprocess.run(two_ranks(job, base), capture_output=True, text=True, timeout=1500, env=ENV)


def loadable(path: Path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def assert_no_partial_files(folder: Path) -> None:
    """Every file in the run folder is whole: no temp left, each LoRA and state loads."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
    for path in folder.glob("*.safetensors"):
        assert loadable(path), path
    for path in folder.glob("*.trainstate.json"):
        assert read_state(path)[0], path


def states(folder: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in folder.glob("*.trainstate.json"))


@pytest.mark.timeout(1800)
def test_nan_loss_stops_both_ranks_with_one_error_and_keeps_the_last_good_checkpoint(
    dataset_dir, comfy_base, loras_dir, clean_cache
):
    # a learning rate that blows the weights up after the first step: the loss is not finite at step 2
    done = run_two_ranks(export("nan_run", steps=4, lr=1e30, save_every=1), comfy_base)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error (rank")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert (
        errors[0].startswith("error (rank 0): the loss became") and "at step 2 (on rank 0 of 2)" in errors[0]
    )
    assert "the last good checkpoint is nan_run-step000001.safetensors" in errors[0]
    folder = loras_dir / "nan_run"
    assert_no_partial_files(folder)
    assert states(folder) == [1] and not (folder / "nan_run.safetensors").exists()
    # resumable: the same job with its steps cut to the last good one resumes there and finishes
    done = run_two_ranks(export("nan_run", steps=1, lr=1e30, save_every=1, existing="resume"), comfy_base)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved " in done.stdout and "after 1 steps" in done.stdout
    assert json.loads((folder / "nan_run.trainstate.json").read_text())["world_size"] == 2
    assert loadable(folder / "nan_run.safetensors")


def rank_process(launcher: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` started by the torch.distributed.run process ``launcher``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.timeout(1800)
def test_a_dead_rank_stops_the_other_and_the_run_resumes_from_the_last_checkpoint(
    dataset_dir, comfy_base, loras_dir, clean_cache
):
    folder = loras_dir / "dead_rank"
    launcher = subprocess.Popen(two_ranks(export("dead_rank", steps=400, save_every=2), comfy_base),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not (folder / "dead_rank-step000002.trainstate.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)
        victim = rank_process(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error (rank")]
    assert len(ours) == 1 and ours[0].startswith("error (rank 0): lost another rank of the job"), err[:6000]
    assert "Signal 9 (SIGKILL)" in err or "SIGKILL" in err  # the launcher names the dead rank's end
    assert_no_partial_files(folder)
    saved = states(folder)
    assert saved and saved[-1] >= 2 and saved[-1] < 400
    # resumable with the same number of ranks: a shorter run resumes from the newest state and finishes
    done = run_two_ranks(
        export("dead_rank", steps=saved[-1] + 1, save_every=2, existing="resume"), comfy_base
    )
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((folder / "dead_rank.trainstate.json").read_text())
    assert final["step"] == saved[-1] + 1 and final["world_size"] == 2
    assert loadable(folder / "dead_rank.safetensors")
