"""Training jobs' bridge to ComfyUI: the checkpoints folder, the jobs folder, the checkpoint loader
and the torch.distributed process group of a headless run (scripts/train_job.py)."""

from __future__ import annotations

import os

import comfy.cli_args
import comfy.model_management
import comfy.sd
import folder_paths
import torch

from ..lora_core.train.parallel import World

JOBS_SUBFOLDER = os.path.join("lora_foundry", "jobs")


def checkpoint_names() -> list[str]:
    return folder_paths.get_filename_list("checkpoints")


def jobs_directory() -> str:
    """output/lora_foundry/jobs, created when missing."""
    folder = os.path.join(folder_paths.get_output_directory(), JOBS_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    return folder


def checkpoint_path(name: str, kind: str = "checkpoints") -> str:
    """The full path of a model file listed by ComfyUI (names outside the folder are refused there)."""
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        found = folder_paths.get_filename_list(kind)
        raise FileNotFoundError(
            f"`model.checkpoint` {name!r} is not in ComfyUI's {kind} folder(s) "
            f"{folder_paths.get_folder_paths(kind)}: put it there or use one of {found[:5]}"
        )
    return path


def load_checkpoint(path: str) -> tuple:
    """(MODEL, CLIP, VAE) as ComfyUI's Load Checkpoint node loads them (inside inference mode, as
    ComfyUI runs its nodes, so the training sees the same kind of weights as in the server)."""
    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(
            path,
            output_vae=True,
            output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
        )
    model, clip, vae = out[:3]
    if clip is None or vae is None:
        raise ValueError(
            f"{os.path.basename(path)} has no text encoder or no VAE: a job needs a full checkpoint"
        )
    return model, clip, vae


def start_world() -> World:
    """Joins the torchrun process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo
    on CPU; World() for a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not comfy.cli_args.args.cpu
        dist.init_process_group("nccl" if cuda else "gloo")
    return World.current()


def barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stop_world() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- Launch Train Job: the jobs folder's files, the folders a job process must use, interruption ---


def job_names() -> list[str]:
    """The job files in output/lora_foundry/jobs (names, sorted)."""
    folder = jobs_directory()
    return sorted(
        n for n in os.listdir(folder) if n.endswith(".json") and os.path.isfile(os.path.join(folder, n))
    )


def comfy_directory() -> str:
    """The folder of the ComfyUI this server runs (the job imports the same one)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(comfy.sd.__file__)))


MODEL_KINDS = ("checkpoints", "loras", "embeddings", "diffusion_models", "text_encoders", "vae")


def folder_arguments() -> list[str]:
    """scripts/train_job.py options giving the job this server's input, output, temp and model
    folders (in the server's search order)."""
    args = ["--input-directory", folder_paths.get_input_directory(),
            "--output-directory", folder_paths.get_output_directory(),
            "--temp-directory", folder_paths.get_temp_directory()]  # fmt: skip
    for kind in MODEL_KINDS:
        if kind in folder_paths.folder_names_and_paths:
            for folder in folder_paths.get_folder_paths(kind):
                args += ["--model-folder", f"{kind}={folder}"]
    return args


def interrupted() -> bool:
    """True once the user pressed Cancel (the flag stays set for check_interrupted to raise)."""
    return comfy.model_management.processing_interrupted()
