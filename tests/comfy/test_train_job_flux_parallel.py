"""Data parallel on a flow-matching DiT: 2 gloo ranks on ComfyUI's tiny Flux (batch 1 each) train
the same LoRA as one process with batch 2 (fp32, max abs difference <= 1e-5), through the trainer
path jobs use (tests/flux_ddp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors

pytestmark = pytest.mark.first_leg  # scripts/run_tests.sh runs these on the first leg (tests/conftest.py)

WORKER = str(Path(__file__).resolve().parents[1] / "flux_ddp_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def weights(path) -> dict:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


@pytest.mark.timeout(1200)
def test_two_gloo_ranks_on_flux_equal_one_process_with_double_batch(tmp_path):
    one = subprocess.run([sys.executable, WORKER, str(tmp_path), "flux_one", "2"], capture_output=True,
                         text=True, timeout=900, env=ENV)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          WORKER, str(tmp_path), "flux_two", "1"], capture_output=True, text=True, timeout=900,
                         env=ENV)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved ") == 1 and "3 steps, 2 rank(s)" in two.stdout  # rank 0 alone writes
    a = weights(tmp_path / "flux_one" / "flux_one.safetensors")
    b = weights(tmp_path / "flux_two" / "flux_two.safetensors")
    assert set(a) == set(b) and any("double_blocks_0_img_attn_qkv" in k for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # it trained
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    state = json.loads((tmp_path / "flux_two" / "flux_two.trainstate.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert sorted(p.name for p in (tmp_path / "flux_two").iterdir()) == [
        "flux_two.safetensors", "flux_two.trainstate", "flux_two.trainstate.json"]  # fmt: skip
