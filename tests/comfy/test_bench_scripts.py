"""The benchmark scripts keep working as the code changes: each starts, and the caption one runs end to end.

Timings are printed by the scripts and never asserted here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.first_leg  # scripts/run_tests.sh runs these on the first leg (tests/conftest.py)

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "bench").glob("bench_*.py"))


def _run(args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_bench_script_starts(script):
    out = _run([str(script), "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_caption_bench_runs_on_a_tiny_set(tmp_path):
    env = dict(os.environ, LORA_FOUNDRY_CACHE=str(tmp_path))  # exports its own 4-block model here
    out = _run([str(REPO / "bench" / "bench_caption.py"), "--quick", "--images", "4"], env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio ours / baseline:" in out.stdout and "our overhead over it:" in out.stdout
    assert (tmp_path / "bench" / "vit_d4_448_bias" / "model.onnx").is_file()


@pytest.mark.timeout(900)
def test_caption_bench_vlm_case_runs_on_two_images():
    out = _run([str(REPO / "bench" / "bench_caption.py"), "--vlm", "--quick", "--images", "2", "--max-new-tokens", "4"],
               timeout=850)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "VLM ratio ours / per-image loop:" in out.stdout and "2 images, max_new_tokens 4" in out.stdout


@pytest.mark.server
def test_server_bench_runs_one_round():
    """Its three graphs run in a real server (5 core loaders, our stack, no LoRA) and the timer node reports."""
    out = _run(
        [str(REPO / "bench" / "bench_stack_server.py"), "--rounds", "1", "--model-only-rounds", "1"],
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "patch phase (MODEL + CLIP)" in out.stdout and "round 1 (patch / whole run)" in out.stdout
    assert "patch, strength_model changed" in out.stdout
