"""Fixtures for tests that need a real ComfyUI server subprocess, on a free loopback port, with this
pack linked into a temporary base directory: one per test session, stopped by its pid at the end.
Imported by the conftest.py of each folder that uses them (tests/server, tests/browser)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import job_run
import pytest
from comfy_server import REPO, ComfyServer, comfy_version, default_comfy_dir, prepare_base_dir

COMFY_DIR = default_comfy_dir()
# LORA_FOUNDRY_FRONTEND_ROOT (scripts/comfy_server.py) serves another frontend build; its version is
# in LORA_FOUNDRY_FRONTEND_VERSION, and LORA_FOUNDRY_VUE_NODES=1 turns on its "Nodes 2.0"
# (scripts/run_tests.sh sets them for its passes on the newest frontend).
FRONTEND_VERSION = os.environ.get("LORA_FOUNDRY_FRONTEND_VERSION")
VUE_NODES = os.environ.get("LORA_FOUNDRY_VUE_NODES") == "1"
# Logs and screenshots go to test-artifacts/comfyui-<version>/, named by the pass, so the passes of
# one `make test` (two ComfyUI versions, two more frontends) do not overwrite each other's.
ARTIFACTS = REPO / "test-artifacts" / f"comfyui-{comfy_version(COMFY_DIR)}"
PASS_SUFFIX = (f"-frontend-{FRONTEND_VERSION}" if FRONTEND_VERSION else "") + (
    "-vue-nodes" if VUE_NODES else ""
)

DEMO_CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
# The large demo files set-up makes once (scripts/make_demo_models.py), linked into each server's base.
DEMO_LINKED = (
    f"checkpoints/{DEMO_CHECKPOINT}",
    "diffusion_models/lora_foundry_demo_flux.safetensors",  # DEMO_FLUX
    "vae/lora_foundry_demo_flux_vae.safetensors",  # DEMO_FLUX_VAE
    "text_encoders/lora_foundry_demo_clip_l.safetensors",  # DEMO_CLIP_L
)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    base = prepare_base_dir(tmp_path_factory.mktemp("server_base"))
    for name in DEMO_LINKED:
        demo = COMFY_DIR / "models" / name
        if demo.exists():
            (base / "models" / name).parent.mkdir(parents=True, exist_ok=True)
            (base / "models" / name).symlink_to(demo)
    job_run.link_compact(base / "models")  # job_run.COMPACT: what the launch tests train
    srv = ComfyServer(comfy_dir=COMFY_DIR, base_dir=base, python=sys.executable)
    srv.start()
    yield srv
    srv.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(srv.log_path, ARTIFACTS / f"server{PASS_SUFFIX}.log")


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture
def server_loras(server) -> Path:
    return server.base_dir / "models" / "loras"


@pytest.fixture(scope="session")
def demo_models(server):
    """The demo checkpoint (made by set-up, linked in) and a demo LoRA this test session writes."""
    ckpt = server.base_dir / "models" / "checkpoints" / DEMO_CHECKPOINT
    for name in DEMO_LINKED:
        if not (server.base_dir / "models" / name).exists():
            pytest.fail(
                f"the demo model {name} is missing at {COMFY_DIR}/models: run scripts/setup_runtime.sh"
            )
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import make_demo_models

    lora = server.base_dir / "models" / "loras" / make_demo_models.DEMO_LORA
    if not lora.exists():
        make_demo_models.write_demo_lora(lora)
        make_demo_models.write_demo_lora_b(lora.with_name(make_demo_models.DEMO_LORA_B))
    tagger = server.base_dir / "models" / "taggers" / make_demo_models.DEMO_TAGGER
    if not tagger.exists():
        make_demo_models.write_demo_tagger(tagger)
    dataset = server.base_dir / "input" / make_demo_models.DEMO_DATASET
    if not dataset.exists():
        make_demo_models.write_demo_dataset(dataset)
    return {"checkpoint": ckpt, "lora": lora, "tagger": tagger, "dataset": dataset}
