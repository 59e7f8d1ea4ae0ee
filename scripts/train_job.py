"""Runs a LoRA Foundry training job (a JSON file from the Export Train Job node) outside the server.

    python scripts/train_job.py JOB.json [--comfyui DIR] [--base-directory DIR] [--cpu]
    torchrun --nproc_per_node N scripts/train_job.py JOB.json ...      # data parallel, N ranks

ComfyUI is imported as a library from --comfyui, else $COMFYUI_PATH, else the pack's .comfyui.
--base-directory DIR: input/, output/ and models/<kind>/ under DIR are used (models first, then
ComfyUI's own). --input-directory / --output-directory / --temp-directory / --model-folder KIND=DIR
name those folders one by one (the Launch Train Job node passes its server's). --events: progress
also as JSON lines (lora_core/train/launch.py) for a launcher. SIGINT or SIGTERM stops every rank at
the next step; rank 0 saves that step as a checkpoint first. Exit status 0 when the run finished,
2 for a bad job or setting (the message names it), 3 stopped on request (checkpoint saved), 1 for
anything else (e.g. another rank died).
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
    parser.add_argument("--input-directory", help="ComfyUI's input folder")
    parser.add_argument("--output-directory", help="ComfyUI's output folder")
    parser.add_argument("--temp-directory", help="ComfyUI's temp folder")
    parser.add_argument("--model-folder", action="append", default=[], metavar="KIND=DIR",
                        help="a models folder, e.g. loras=/data/loras (repeatable; searched in the order given)")  # fmt: skip
    parser.add_argument("--events", action="store_true", help="also print progress as JSON event lines")
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


def use_folders(args: argparse.Namespace) -> None:
    import folder_paths

    for option, setter in (("input_directory", folder_paths.set_input_directory),
                           ("output_directory", folder_paths.set_output_directory),
                           ("temp_directory", folder_paths.set_temp_directory)):  # fmt: skip
        if getattr(args, option):
            setter(str(Path(getattr(args, option)).resolve()))
    for entry in reversed(args.model_folder):  # each is put first: the first given is searched first
        kind, sep, folder = entry.partition("=")
        if not sep or kind not in folder_paths.folder_names_and_paths:
            raise SystemExit(f"error: --model-folder {entry!r} should be KIND=DIR with a ComfyUI model kind")
        folder_paths.add_model_folder_path(kind, str(Path(folder).resolve()), is_default=True)


def stop_on_signals(ranks: int) -> None:
    """SIGINT / SIGTERM ask the run to stop: one process stops at once (ComfyUI's interrupt flag,
    checked before every block of the model); the ranks of a torchrun job agree to stop before the
    same micro-batch (lora_core.train.parallel.request_stop). A second signal stops at once."""
    import signal

    import comfy.model_management

    from lora_foundry.lora_core.train.parallel import request_stop, stop_requested

    def on_signal(sig, frame):
        if stop_requested() or comfy.model_management.processing_interrupted():
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        if ranks > 1:
            request_stop(sig)
        else:
            comfy.model_management.interrupt_current_processing(True)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    one_gpu_per_rank()
    import_comfy(Path(args.comfyui).resolve(), args.cpu)
    if args.base_directory:
        use_base_directory(Path(args.base_directory).resolve())
    use_folders(args)
    stop_on_signals(int(os.environ.get("WORLD_SIZE", "1")))
    import comfy.model_management

    from lora_foundry.lora_core.train.job import read_job
    from lora_foundry.lora_core.train.parallel import JobStoppedError
    from lora_foundry.nodes import comfy_bridge_job as job_bridge
    from lora_foundry.nodes.train import USER_ERRORS
    from lora_foundry.nodes.train_job_run import run_job

    world = job_bridge.start_world()
    stopped = (comfy.model_management.InterruptProcessingException, JobStoppedError)
    try:
        run_job(read_job(args.job), world, events=args.events)
    except stopped:
        if world.writes:
            print("stopped on request; the last completed step is saved (run the job again to resume)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return 3
    except USER_ERRORS as e:
        # the same on every rank (a bad job, a NaN loss summed over the ranks): rank 0 says it once
        if world.writes or not isinstance(e, FloatingPointError):
            print(f"error (rank {world.rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:
        if world.size <= 1:
            raise
        # a rank that died or was killed breaks the collectives of the others
        print(f"error (rank {world.rank}): lost another rank of the job, it died or was killed ({str(e)[:200]}); "
              "every rank stops. The last checkpoint in the run folder is kept: run the job again to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    finally:
        job_bridge.stop_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
