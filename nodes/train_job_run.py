"""A training job run headless (scripts/train_job.py): the checkpoint loaded by ComfyUI's loader, the
data set and the run built exactly as LoRA Training Dataset and Train LoRA build them, on one
process or as one rank of a torchrun job (rank 0 writes every file; the others only train)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..lora_core.train.dataset import batch_encoder, build_dataset, scan_dataset
from ..lora_core.train.existing import handle_existing
from ..lora_core.train.job import TrainJob
from ..lora_core.train.launch import encode_event
from ..lora_core.train.parallel import World
from ..lora_core.train.run import RunResult
from ..lora_core.train.trainer import StepReport
from . import comfy_bridge_job as job_bridge
from . import comfy_bridge_train as train_bridge
from .train import NetworkSettings, SampleSettings, _dataset_folder, _encoder_id, plan_run, run_training


def job_dataset(job: TrainJob, vae, clip, world: World):
    """The cached data set of the job. With several ranks the cache goes to disk and rank 0 builds
    it first; the others then read it (encoded once, the same tensors on every rank)."""
    cache = "disk" if world.size > 1 else job.dataset_source.cache
    scan = scan_dataset(_dataset_folder(job.dataset_source.folder), job.dataset)
    cache_dir = Path(train_bridge.cache_directory()) if cache == "disk" else None

    def build():
        with torch.inference_mode():  # as ComfyUI runs the dataset node
            return build_dataset(scan, job.dataset, train_bridge.image_encoder(vae),
                                 batch_encoder(train_bridge.caption_encoder(clip)), cache_dir,
                                 _encoder_id(vae, clip, cache))  # fmt: skip

    dataset = build() if world.writes else None
    job_bridge.barrier()
    return dataset if dataset is not None else build()


def progress_printer(world: World, stream=None):
    """on_report for rank 0: a tqdm bar on a terminal, plain lines otherwise (logs, CI, SLURM)."""
    stream = stream or sys.stdout
    if not world.writes:
        return None
    if stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", file=stream)

        def on_bar(report: StepReport) -> None:
            bar.total = report.total
            bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}")
            bar.update(report.step - bar.n)

        return on_bar

    def on_line(report: StepReport) -> None:
        print(f"step {report.step}/{report.total} loss {report.loss:.6f} lr {report.lr:.3e} "
              f"eta {report.eta_s:.0f}s", file=stream, flush=True)  # fmt: skip

    return on_line


def event_printer(world: World, printer, stream=None):
    """on_report for rank 0 with --events: each step also as an event line (lora_core.train.launch),
    with the seconds spent in all-reduces (0 on one process)."""
    stream = stream or sys.stdout

    def on_report(report: StepReport) -> None:
        if printer is not None:
            printer(report)
        line = encode_event("step", step=report.step, total=report.total, loss=float(report.loss),
                            lr=float(report.lr), eta_s=float(report.eta_s),
                            allreduce_s=float(getattr(report, "allreduce_s", 0.0)))  # fmt: skip
        print(line, file=stream, flush=True)

    return on_report


def run_job(job: TrainJob, world: World | None = None, events: bool = False) -> RunResult:
    """Trains the job to its end (resuming from the run folder's state when `existing` says so).
    ``events``: rank 0 also prints its progress as event lines for a launcher."""
    world = world or World()
    started = time.time()
    model, clip, vae = job_bridge.load_checkpoint(
        job_bridge.checkpoint_path(job.model.checkpoint, job.model.folder)
    )
    dataset = job_dataset(job, vae, clip, world)
    net = NetworkSettings(**asdict(job.network))
    out = job.output
    plan = plan_run(
        model,
        dataset,
        net,
        out.name,
        out.save_every,
        out.keep_last,
        out.save_dtype,
        SampleSettings(),
        out.key_names,
    )
    if world.writes:
        handle_existing(plan, out.existing)
    job_bridge.barrier()  # the others read the run folder (resume) only once rank 0 has prepared it
    report = progress_printer(world)
    if world.writes:
        print(f"training {plan.name}: {dataset.num_images} images, {world.size} rank(s)", flush=True)
        if events:
            print(
                encode_event("start", name=plan.name, ranks=world.size, images=dataset.num_images), flush=True
            )
            report = event_printer(world, report)
    with torch.inference_mode(False), torch.enable_grad():
        result = run_training(model, clip, dataset, job.train, net, plan, None, None, world, report)
    job_bridge.barrier()
    if world.writes:
        print(f"saved {result.path} after {result.step} steps in {time.time() - started:.0f}s", flush=True)
        if events:
            print(encode_event("done", path=str(result.path), step=result.step), flush=True)
    return result
