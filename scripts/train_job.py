"""Runs a LoRA Foundry training job (a JSON file from the Export Train Job node) outside the server.

    python scripts/train_job.py JOB.json [--comfyui DIR] [--base-directory DIR] [--cpu]
    torchrun --nproc_per_node N scripts/train_job.py JOB.json ...      # data parallel, N ranks

ComfyUI is imported as a library from --comfyui, else $COMFYUI_PATH, else the pack's .comfyui.
--base-directory DIR: input/, output/ and models/<kind>/ under DIR are used (models first, then
ComfyUI's own). Exit status 0 when the run finished, 2 for a bad job or setting (the message
names it), 1 for anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lora_foundry"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a LoRA Foundry training job headless (also under torchrun)."
    )
    parser.add_argument("job", help="the job file (.json) written by Export Train Job")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(REPO / ".comfyui"),
                        help="ComfyUI folder to import (default: $COMFYUI_PATH or the pack's .comfyui)")  # fmt: skip
    parser.add_argument("--base-directory", help="use input/, output/ and models/ under this folder")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    return parser.parse_args(argv)


def one_gpu_per_rank() -> None:
    # Under torchrun each rank sees only its own GPU (before torch is imported), so ComfyUI's
    # device choice (the current CUDA device) is that rank's.
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local) % len(devices)] if devices else local


def import_comfy(comfy_dir: Path, cpu: bool) -> None:
    """ComfyUI importable as a library, and the pack as the package ``lora_foundry``."""
    if not (comfy_dir / "comfy").is_dir():
        raise SystemExit(f"error: {comfy_dir} is not a ComfyUI folder: pass --comfyui or set COMFYUI_PATH")
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = cpu or not torch.cuda.is_available()
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(REPO)]
        package.__file__ = str(REPO / "__init__.py")
        sys.modules[PACKAGE] = package


def use_base_directory(base: Path) -> None:
    import folder_paths

    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    for kind in ("checkpoints", "loras", "embeddings"):
        folder_paths.add_model_folder_path(kind, str(base / "models" / kind), is_default=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_gpu_per_rank()
    import_comfy(Path(args.comfyui).resolve(), args.cpu)
    if args.base_directory:
        use_base_directory(Path(args.base_directory).resolve())
    from lora_foundry.lora_core.train.job import read_job
    from lora_foundry.nodes import comfy_bridge_job as job_bridge
    from lora_foundry.nodes.train import USER_ERRORS
    from lora_foundry.nodes.train_job_run import run_job

    world = job_bridge.start_world()
    try:
        run_job(read_job(args.job), world)
    except USER_ERRORS as e:
        print(f"error (rank {world.rank}): {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        job_bridge.stop_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
