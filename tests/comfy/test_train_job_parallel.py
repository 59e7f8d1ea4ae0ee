"""Data-parallel training jobs: scripts/train_job.py under torchrun with 2 gloo ranks on the CPU
trains the same LoRA as one process with the batch doubled (same global batch, same seed), and
only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors
from job_run import COMPACT, SETTINGS, run_headless, script_args
from train_run import DATASET_ARGS, TRAIN_ARGS

from lora_foundry.nodes.train_job import ExportTrainJob

pytestmark = pytest.mark.first_leg  # scripts/run_tests.sh runs these on the first leg (tests/conftest.py)


def export(name: str, batch_size: int) -> str:
    settings = {**TRAIN_ARGS, **SETTINGS, "output_name": name, "batch_size": batch_size}
    return ExportTrainJob().execute(COMPACT, **{**DATASET_ARGS, "folder": "train_set"}, **settings)["result"][
        0
    ]


def weights(path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.timeout(1800)
def test_two_gloo_ranks_equal_one_rank_with_double_batch(dataset_dir, comfy_base, loras_dir, compact_sd15):
    one = run_headless(export("one_rank", 2), comfy_base)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script_args(export("two_ranks", 1), comfy_base)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = comfy_base / "output" / "lora_foundry_cache"
    before = set(cache.glob("*")) if cache.exists() else set()
    try:
        two = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    finally:  # the shared session folder is left as found (other tests count the cache's files)
        for path in set(cache.glob("*")) - before if cache.exists() else ():
            path.unlink()
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout and two.stdout.count("step 2/2 loss") == 1  # rank 0 alone reports
    a = weights(loras_dir / "one_rank" / "one_rank.safetensors")
    b = weights(loras_dir / "two_ranks" / "two_ranks.safetensors")
    assert set(a) == set(b) and len(a) > 0
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    # one writer: exactly the final LoRA and its state, no temp left by a second writer
    assert sorted(p.name for p in (loras_dir / "two_ranks").iterdir()) == [
        "two_ranks.safetensors", "two_ranks.trainstate", "two_ranks.trainstate.json"]  # fmt: skip
    state = json.loads((loras_dir / "two_ranks" / "two_ranks.trainstate.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2


@pytest.mark.timeout(1800)
def test_two_gloo_ranks_stopped_and_resumed_equal_an_uninterrupted_run(
    dataset_dir, comfy_base, loras_dir, compact_sd15
):
    """2 ranks for 1 step, then the same job resumed to step 2 with 2 ranks, equals 2 ranks for 2
    steps without a stop (fp32, 1e-6): the state carries each rank's optimizer and data order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = comfy_base / "output" / "lora_foundry_cache"
    before = set(cache.glob("*")) if cache.exists() else set()

    def two_ranks(name: str, **changes) -> str:
        settings = {**TRAIN_ARGS, **SETTINGS, "output_name": name, "batch_size": 1, **changes}
        job = ExportTrainJob().execute(COMPACT, **{**DATASET_ARGS, "folder": "train_set"}, **settings)[
            "result"
        ][0]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *script_args(job, comfy_base)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    try:
        two_ranks("ddp_whole")
        two_ranks("ddp_resumed", steps=1)
        assert (
            json.loads((loras_dir / "ddp_resumed" / "ddp_resumed.trainstate.json").read_text())["step"] == 1
        )
        resumed = two_ranks("ddp_resumed", existing="resume")
        # it went on from step 1: only step 2 was trained (rank 0 alone reports)
        assert "step 1/2 loss" not in resumed and resumed.count("step 2/2 loss") == 1, resumed[-2000:]
    finally:  # the shared session folder is left as found (other tests count the cache's files)
        for path in set(cache.glob("*")) - before if cache.exists() else ():
            path.unlink()
    a = weights(loras_dir / "ddp_whole" / "ddp_whole.safetensors")
    b = weights(loras_dir / "ddp_resumed" / "ddp_resumed.safetensors")
    assert set(a) == set(b) and len(a) > 0
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    state = json.loads((loras_dir / "ddp_resumed" / "ddp_resumed.trainstate.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
