"""The vision-language case of bench_caption.py: the pack's batched path against a per-image generate loop.

Baseline: what a one-image-at-a-time captioner node does for a folder, with the model already loaded (its
load is not counted): for each image the processor on that image alone and one `model.generate` call,
greedy, then decode. Ours: caption_folder_vlm on the same folder (decode, batches padded on the left, one
generate per batch with the KV cache, cleaning, captions written). Both greedy with the same max new tokens,
on the same model object, in the same run; rounds alternate so load from other processes hits both alike.

Model: a Qwen2-VL-class model shaped like the real ones (Qwen2 decoder with M-RoPE, a ViT with 14-pixel
patches merged 2x2, the same processor and chat format), narrowed to fit a small CPU: by default 4 decoder
layers of width 512 and images resized to at most 224x224 (64 image tokens each).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_vlm import build_tiny_vlm

from lora_foundry.lora_core.caption.captioning import RunOptions
from lora_foundry.lora_core.caption.vlm import load_captioner
from lora_foundry.lora_core.caption.vlm_run import caption_folder_vlm
from lora_foundry.lora_core.caption.vlm_text import SentenceOptions, instruction

ROUNDS = 2


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = int(rng.integers(200, 420)), int(rng.integers(200, 420))
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"img{i:03d}.png")


def per_image_loop(captioner, images: list[Path], options: SentenceOptions) -> float:
    """Seconds for the baseline: processor + generate once per image, batch 1, no padding."""
    import torch

    processor, model = captioner.processor, captioner.model
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction(options)}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    start = time.perf_counter()
    for path in images:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=options.max_new_tokens, do_sample=False)
        processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - start


def batched(captioner, folder: Path, options: SentenceOptions, batch_size: int) -> float:
    out = folder.parent / f"{folder.name}_captions"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = caption_folder_vlm(folder, captioner, options, RunOptions(mode="overwrite", output_dir=out,
                                                                         batch_size=batch_size))  # fmt: skip
    seconds = time.perf_counter() - start
    assert len(report.tagged) + len(report.failed) == len(list(folder.glob("*.png"))), report.summary()
    return seconds


def run(tmp: Path, count: int, quick: bool, batch_size: int, max_new_tokens: int) -> None:
    import torch

    layers, width = (2, 128) if quick else (4, 512)
    model_dir = build_tiny_vlm(
        tmp / "qwen2_vl", "qwen2_vl", seed=0, layers=layers, width=width, pixels=224 * 224
    )
    captioner = load_captioner(model_dir)
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6
    print(f"Qwen2-VL-class model: {layers} layers, width {width}, {params:.1f} M parameters; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {count} images, max_new_tokens {max_new_tokens}")  # fmt: skip
    images_dir = tmp / "images"
    make_images(images_dir, count)
    images = sorted(images_dir.glob("*.png"))
    options = SentenceOptions(preset="detailed", max_new_tokens=max_new_tokens)
    base = ours = 0.0
    for r in range(ROUNDS):
        base += per_image_loop(captioner, images, options)
        ours += batched(captioner, images_dir, options, batch_size)
        print(f"  round {r + 1}/{ROUNDS}: per-image loop {base:.1f} s, ours {ours:.1f} s", flush=True)
    n = count * ROUNDS
    print(f"per-image generate loop (batch 1):   {n / base:5.2f} img/s  {base / n * 1000:6.0f} ms/img")
    print(
        f"ours (batch {batch_size}, padded, KV cache): {n / ours:5.2f} img/s  {ours / n * 1000:6.0f} ms/img"
    )
    print(f"VLM ratio ours / per-image loop: {base / ours:.2f}x  (goal >= 2x)")
