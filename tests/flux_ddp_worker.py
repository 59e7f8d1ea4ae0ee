"""One rank (or the single process) of the Flux data-parallel test: ComfyUI's tiny Flux MODEL
(scripts/model_factory.py, seeded, so every rank builds the same weights) trained through the same
run_training as Train LoRA and jobs, on cached latents and caption embeddings (a Flux job's
encoders, CLIP-L + T5-XXL, have fixed sizes, so no tiny Flux checkpoint can carry them).

    python tests/flux_ddp_worker.py LORAS_DIR NAME BATCH                      # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/flux_ddp_worker.py ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()


def main(loras: str, name: str, batch: int) -> None:
    sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]
    import train_job  # scripts/train_job.py: ComfyUI and the pack importable, as a job has them

    train_job.import_comfy(COMFY_DIR, cpu=True)
    import folder_paths
    import model_factory
    import torch
    from flow_data import flux_dataset

    from lora_foundry.lora_core.train.trainer import TrainConfig
    from lora_foundry.nodes import comfy_bridge_job as job_bridge
    from lora_foundry.nodes.train import NetworkSettings, SampleSettings, plan_run, run_training

    torch.set_num_threads(1)
    folder_paths.folder_names_and_paths["loras"] = ([loras], folder_paths.supported_pt_extensions)
    world = job_bridge.start_world()
    try:
        model = model_factory.flux_model()
        dataset = flux_dataset(4)
        # Train LoRA's default learning rate, as the SD1.5 data-parallel test (at 1e-3, AdamW turns the
        # float rounding of near-zero gradients summed in another order into up to 3e-5 on 3 of 60 tensors)
        cfg = TrainConfig(steps=3, batch_size=batch, lr=1e-4, precision="fp32", seed=5)
        net = NetworkSettings(4, 4.0, "attention_ff", "", False, False)
        plan = plan_run(model, dataset, net, name, 0, 3, "fp32", SampleSettings())
        if world.writes:
            plan.folder.mkdir(parents=True, exist_ok=True)
        job_bridge.barrier()
        with torch.inference_mode(False), torch.enable_grad():
            result = run_training(model, None, dataset, cfg, net, plan, None, None, world)
        if world.writes:
            print(f"saved {result.path} after {result.step} steps, {world.size} rank(s)", flush=True)
    finally:
        job_bridge.stop_world()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
