"""Writes the demo models into a ComfyUI tree, once: a full-size SD1.5 checkpoint with random
weights (ComfyUI detects it as SD1.5; the images it makes are noise), a small kohya-format LoRA
for it, and a Flux-architecture diffusion model (models/diffusion_models) with a 16-channel
Flux-style VAE (models/vae), random weights too, and the checkpoint's CLIP-L as a text-encoder
file (models/text_encoders) to condition it. A real checkpoint put in models/checkpoints
replaces the demo one in the workflows.

The demo Flux has one double and one single block at Flux's real width: ComfyUI's detection fixes
Flux's head count (24) and rotary axes (16 + 56 + 56 = head dim 128), so hidden 3072 is the only
width it loads as Flux. Its text and vector inputs are 768 wide (ComfyUI reads them from txt_in /
vector_in), so the demo checkpoint's CLIP-L conditions it and no T5 is needed.

    python scripts/make_demo_models.py --comfyui .comfyui [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEMO_CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
DEMO_LORA = "lora_foundry_demo_lora.safetensors"
DEMO_LORA_B = "lora_foundry_demo_lora_b.safetensors"  # a second one, for the stack and merge demo
DEMO_TAGGER = "lora_foundry_demo_tagger"  # models/taggers/<this>/model.onnx + selected_tags.csv
DEMO_DATASET = "lora_foundry_demo_dataset"  # input/<this>/*.png
DEMO_FLUX = "lora_foundry_demo_flux.safetensors"  # models/diffusion_models/<this> (UNETLoader)
DEMO_FLUX_VAE = "lora_foundry_demo_flux_vae.safetensors"  # models/vae/<this> (VAELoader)
DEMO_CLIP_L = "lora_foundry_demo_clip_l.safetensors"  # models/text_encoders/<this> (CLIPLoader)
# The demo tagger reads only the mean colour of an image: a real WD14-signature model, not a trained one.
COLOUR_TAGS = [
    ("red theme", 0),
    ("green theme", 0),
    ("blue theme", 0),
    ("bright", 0),
    ("dark", 0),
    ("demo", 9),
]


def _setup_comfy(comfy_dir: Path) -> None:
    sys.path.insert(0, str(comfy_dir))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def _meta_shapes(module_factory) -> dict[str, torch.Size]:
    with torch.device("meta"):
        module = module_factory()
    return {k: v.shape for k, v in module.state_dict().items()}


def _random_tensor(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = max(1, int(torch.Size(shape[1:]).numel()))
    scale = 0.02 if "embedding" in name else fan_in**-0.5
    return (torch.randn(shape, generator=g) * scale).to(torch.float16)


def compact_unet_config() -> dict:
    """An SD1.5 UNet of one level (320 channels, one res block and one transformer on the way down and
    two on the way up): ComfyUI's detection reads it as SD1.5 (its 320 channels and 768-wide context
    are what it matches), with 26 M parameters instead of 860 M. The tests' training jobs use it."""
    from model_factory import SD15_FULL, sd15_unet_config

    config = sd15_unet_config(SD15_FULL)
    config.update(
        num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1]
    )
    return config


def checkpoint_shapes(unet_config: dict | None = None) -> dict[str, torch.Size]:
    """Every key and shape of a standard SD1.5 checkpoint (or one with ``unet_config``'s UNet and the
    standard CLIP-L and VAE), from ComfyUI's own classes."""
    import comfy.sd1_clip
    import comfy.supported_models as sm
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from model_factory import SD15_FULL, sd15_unet_config, vae_config

    config = sm.SD15(unet_config or sd15_unet_config(SD15_FULL))
    config.set_inference_dtype(torch.float16, None)
    shapes = {}
    unet = _meta_shapes(lambda: config.get_model({}, device="meta").diffusion_model)
    shapes.update({"model.diffusion_model." + k: v for k, v in unet.items()})
    clip = _meta_shapes(lambda: comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16))
    shapes.update(
        {
            "cond_stage_model." + k: v
            for k, v in clip.items()
            if "text_projection" not in k and "logit_scale" not in k
        }
    )
    cfg = vae_config(128)
    vae = _meta_shapes(lambda: AutoencoderKL(ddconfig=cfg["ddconfig"], embed_dim=cfg["embed_dim"]))
    shapes.update({"first_stage_model." + k: v for k, v in vae.items()})
    return shapes


def write_checkpoint(path: Path, seed: int = 0, unet_config: dict | None = None) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {k: _random_tensor(k, s, g) for k, s in checkpoint_shapes(unet_config).items()}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"lora_foundry.demo": "random weights: images are noise"})
    os.replace(tmp, path)


def flux_unet_config() -> dict:
    """What ComfyUI's detection reads from the demo Flux file (comfy/model_detection.py): Flux.1 dev
    (guidance_in present) at the real width and head layout, 1 double + 1 single block, CLIP-L widths."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 768, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
        "qkv_bias": True, "guidance_embed": True,
    }  # fmt: skip
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # ComfyUI 0.8+
        config["txt_ids_dims"] = []
    return config


def flux_shapes() -> dict[str, torch.Size]:
    import comfy.supported_models as sm

    config = sm.Flux(flux_unet_config())
    config.set_inference_dtype(torch.bfloat16, None)
    return _meta_shapes(lambda: config.get_model({}, device="meta").diffusion_model)


def flux_vae_shapes() -> dict[str, torch.Size]:
    """Flux's VAE layout (encoder.* / decoder.*, 16 latent channels, no quant convs), as ComfyUI builds it."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {**_vae_ddconfig(), "z_channels": 16}
    return _meta_shapes(
        lambda: AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
        )
    )


def _vae_ddconfig() -> dict:
    from model_factory import vae_config

    return dict(vae_config(128)["ddconfig"])


def _write_random(
    path: Path, shapes: dict[str, torch.Size], seed: int, dtype: torch.dtype, what: str
) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {k: _random_tensor(k, s, g).to(dtype) for k, s in shapes.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"lora_foundry.demo": f"{what}, random weights: images are noise"})
    os.replace(tmp, path)


def write_demo_flux(path: Path, seed: int = 3) -> None:
    _write_random(
        path, flux_shapes(), seed, torch.bfloat16, "Flux-architecture model (1 double, 1 single block)"
    )


def write_demo_flux_vae(path: Path, seed: int = 4) -> None:
    _write_random(path, flux_vae_shapes(), seed, torch.float16, "Flux-style 16-channel VAE")


def write_demo_clip_l(path: Path, checkpoint: Path) -> None:
    """The demo checkpoint's CLIP-L alone, as a text-encoder file (HF key names, as clip_l.safetensors
    ships): the Flux workflow loads it with CLIPLoader instead of the whole 2 GB checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = "cond_stage_model.transformer."
    with safe_open(str(checkpoint), "pt") as f:
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    # As clip_l.safetensors ships it; SD1.5 checkpoints carry none (ComfyUI's default for it is the identity).
    width = tensors["text_model.final_layer_norm.weight"].shape[0]
    tensors["text_projection.weight"] = torch.eye(width, dtype=torch.float16)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"lora_foundry.demo": "CLIP-L of the demo SD1.5 checkpoint"})
    os.replace(tmp, path)


def demo_lora_tensors(rank: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """A kohya LoRA on every attention projection of the SD1.5 UNet and text encoder."""
    shapes = checkpoint_shapes()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def add(name: str, weight_shape: torch.Size) -> None:
        d_out, d_in = int(weight_shape[0]), int(torch.Size(weight_shape[1:]).numel())
        out[f"{name}.lora_down.weight"] = (torch.randn(rank, d_in, generator=g) * d_in**-0.5).half()
        out[f"{name}.lora_up.weight"] = (torch.randn(d_out, rank, generator=g) * 0.5 * rank**-0.5).half()
        out[f"{name}.alpha"] = torch.tensor(float(rank) / 2)

    import comfy.utils
    from model_factory import SD15_FULL, sd15_unet_config

    to_ldm = comfy.utils.unet_to_diffusers(sd15_unet_config(SD15_FULL))
    for diffusers_key, ldm_key in sorted(to_ldm.items()):
        if ".attn" in diffusers_key and diffusers_key.endswith(
            (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
        ):
            name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
            add(name, shapes["model.diffusion_model." + ldm_key])
    prefix = "cond_stage_model.transformer.text_model.encoder.layers."
    for key, shape in sorted(shapes.items()):
        if key.startswith(prefix) and key.endswith(("_proj.weight",)) and "self_attn" in key:
            name = "lora_te_" + key[len("cond_stage_model.transformer.") : -len(".weight")].replace(".", "_")
            add(name, shape)
    return out


def write_demo_lora(path: Path, rank: int = 8, seed: int = 1, trigger: str = "foundrystyle") -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": path.stem,
        "ss_tag_frequency": json.dumps({"demo": {trigger: 10, "noise": 4}}),
    }
    save_file(demo_lora_tensors(rank, seed), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_demo_lora_b(path: Path) -> None:
    write_demo_lora(path, rank=4, seed=2, trigger="foundryglow")


def write_demo_tagger(folder: Path) -> None:
    import numpy as np
    from tiny_tagger import build_tiny_tagger

    # Rows are the model's B, G, R channel means in 0..1; columns the tags above.
    w = np.array([[-4, -4, 8, 3, -3, 0], [-4, 8, -4, 3, -3, 0], [8, -4, -4, 3, -3, 0]], np.float32)
    build_tiny_tagger(folder, COLOUR_TAGS, probs=[0.3, 0.3, 0.3, 0.1, 0.9, 0.5], size=64, weights=w)


def write_demo_dataset(folder: Path, n: int = 6) -> None:
    """Small images of coloured shapes in three aspect ratios (so buckets differ)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]
    sizes = [(320, 320), (384, 256), (256, 384)]
    for i in range(n):
        w, h = sizes[i % 3]
        img = Image.new("RGB", (w, h), tuple(c // 4 for c in colours[i % 3]))
        draw = ImageDraw.Draw(img)
        draw.ellipse([w // 6 + 8 * i, h // 6, w - w // 6, h - h // 6 - 4 * i], fill=colours[i % 3])
        img.save(folder / f"demo_{i:02d}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--comfyui", required=True, type=Path, help="ComfyUI folder (models/ is written inside it)"
    )
    ap.add_argument("--force", action="store_true", help="write the files again even if present")
    args = ap.parse_args()
    comfy_dir = args.comfyui.resolve()
    _setup_comfy(comfy_dir)
    ckpt = comfy_dir / "models" / "checkpoints" / DEMO_CHECKPOINT
    lora = comfy_dir / "models" / "loras" / DEMO_LORA
    tagger = comfy_dir / "models" / "taggers" / DEMO_TAGGER
    dataset = comfy_dir / "input" / DEMO_DATASET
    flux = comfy_dir / "models" / "diffusion_models" / DEMO_FLUX
    flux_vae = comfy_dir / "models" / "vae" / DEMO_FLUX_VAE
    clip_l = comfy_dir / "models" / "text_encoders" / DEMO_CLIP_L
    for path, writer, what in (
        (ckpt, write_checkpoint, "demo SD1.5 checkpoint (random weights, 2.1 GB)"),
        (lora, write_demo_lora, "demo LoRA"),
        (lora.with_name(DEMO_LORA_B), write_demo_lora_b, "second demo LoRA"),
        (tagger, write_demo_tagger, "demo colour tagger (WD14 signature)"),
        (dataset, write_demo_dataset, "demo image folder"),
        (flux, write_demo_flux, "demo Flux-architecture model (random weights, 1.1 GB)"),
        (flux_vae, write_demo_flux_vae, "demo Flux-style VAE (random weights, 170 MB)"),
        (clip_l, lambda p: write_demo_clip_l(p, ckpt), "the demo checkpoint's CLIP-L as a text encoder file"),
    ):
        if path.exists() and not args.force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        print(f"[demo models] writing {what}: {path}", flush=True)
        writer(path)
        print(f"[demo models] done in {time.time() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
