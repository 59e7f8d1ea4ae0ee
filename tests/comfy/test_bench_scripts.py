"""The benchmark scripts keep working as the code changes: each starts, and the caption one runs end to end.

Timings are printed by the scripts and never asserted here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
