"""Train LoRA runs on the tiny in-process models, shared by the training and interop tests: a
small captioned image folder, and the two nodes run as ComfyUI runs them (inside inference_mode)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lora_foundry.nodes.train import LoraTrainingDataset, TrainLora


def write_dataset(root) -> None:
    """Three images of different shapes with captions, one kohya repeat folder, one stray folder."""
    (root / "3_extra").mkdir(parents=True)
    (root / "notes").mkdir()
    rng = np.random.default_rng(0)
    for name, size, caption in [
        ("a.png", (96, 64), "red, square, outdoors"),
        ("b.png", (64, 64), "blue, circle"),
        ("3_extra/c.png", (64, 96), "green, tall"),
    ]:
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / name)
        (root / name).with_suffix(".txt").write_text(caption)


DATASET_ARGS = dict(resolution=64, trigger_word="zkw", buckets=True, crop="center", flip=False, shuffle_tags=False,
                    keep_tags=0, caption_dropout=0.0, repeats=1, cache="memory")  # fmt: skip
TRAIN_ARGS = dict(output_name="tiny", steps=3, epochs=0, batch_size=1, grad_accum=1, rank=4, alpha=2.0,
                  targets="attention", blocks="", lr=1e-3, te_lr=0.0, optimizer="AdamW", scheduler="constant",
                  warmup_steps=0, warmup_ratio=0.0, min_snr_gamma=0.0, noise_offset=0.0, loss="MSE",
                  precision="fp32", gradient_checkpointing=True, seed=1, loraplus_ratio=1.0, dora=False,
                  save_every=0, keep_last=3, save_dtype="fp32", existing="overwrite")  # fmt: skip


def make_dataset(models, folder="train_set", **changes):
    with torch.inference_mode():
        return LoraTrainingDataset().execute(folder, models.vae, models.clip, **{**DATASET_ARGS, **changes})


def train(models, dataset, **changes):
    """Runs Train LoRA on the models' MODEL and CLIP (train_model)."""
    return train_model(models.model, dataset, clip=models.clip, **changes)


def train_model(model, dataset, clip=None, unique_id: str = "7", **changes):
    """Runs Train LoRA (inside inference_mode, as ComfyUI runs a graph), then unloads every model, as
    the next graph's load would: the session's shared models are left as found (not held loaded by
    the training's patchers), so later tests that call ``patch_model`` on them directly start from
    the same state whatever ran before."""
    import comfy.model_management

    try:
        with torch.inference_mode():
            return TrainLora().execute(model, clip, dataset, **{**TRAIN_ARGS, **changes}, unique_id=unique_id)
    finally:
        comfy.model_management.unload_all_models()
