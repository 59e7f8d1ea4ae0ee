"""Bypass mode and the Wan 2.2 LoRA Pair in a real ComfyUI server: the apply_mode widget is the last input
(old graphs keep their values), a bypassed LoRA samples the image patch mode does, and the pair node
applies a high/low pair to two Wan experts loaded by UNETLoader and refuses a swapped one."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_server import PromptFailed, output_files
from PIL import Image
from safetensors.torch import save_file

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]

CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
MODE_NODES = ("LoraFoundry_LoadLora", "LoraFoundry_LoadLoraModelOnly", "LoraFoundry_ApplyLoraStack")


@pytest.mark.parametrize("node", MODE_NODES)
def test_apply_mode_is_the_last_input_and_defaults_to_patching(object_info, node):
    spec = object_info[node]["input"]
    names = [*spec["required"], *spec.get("optional", {})]
    assert names[-1] == "apply_mode", names
    options, extra = spec["optional"]["apply_mode"]
    assert options == ["patch weights", "bypass", "bypass (patch what cannot)"]
    assert extra["default"] == "patch weights" and "quantized" in extra["tooltip"]


def _sample_prompt(lora: str, mode: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraFoundry_LoadLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora, "strength_model": 0.9,
            "strength_clip": 0.7, "block_weights": "", "apply_mode": mode}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 3,
            "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
    }  # fmt: skip


def _image(server, entry) -> np.ndarray:
    (path,) = [f for f in output_files(entry) if f.endswith(".png")]
    return np.asarray(Image.open(server.base_dir / path), dtype=np.int16)


def test_bypassed_lora_samples_the_image_patch_mode_does(server, demo_models):
    lora = demo_models["lora"].name
    runs = {mode: server.run(_sample_prompt(lora, mode, f"bypass_{i}"), timeout=900)
            for i, mode in enumerate(("patch weights", "bypass"))}  # fmt: skip
    report = runs["bypass"]["outputs"]["9"]["text"][0]
    assert "bypass mode (unet)" in report and "bypass mode (clip)" in report, report
    patched, bypassed = _image(server, runs["patch weights"]), _image(server, runs["bypass"])
    assert np.abs(patched - bypassed).max() <= 2, "bypass and patch mode images differ beyond 8-bit rounding"


# A Wan 2.1 / 2.2 DiT that ComfyUI's model detection reads from its state dict (num_heads = dim / 128,
# freq_dim 256, text width 4096), with two blocks: the two experts are two such files.
WAN_CONFIG = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "freq_dim": 256,
              "text_dim": 4096, "num_heads": 1, "num_layers": 2, "in_dim": 16, "out_dim": 16}  # fmt: skip


def _write_experts(server) -> tuple[str, str]:
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.supported_models as sm
    import model_factory
    from wan_loras import write_pair

    folder = server.base_dir / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for seed, side in ((0, "high"), (1, "low")):
        model = model_factory._dit_patcher(sm.WAN21_T2V, dict(WAN_CONFIG), seed)
        sd = {k: v.contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
        names.append(f"tiny_wan22_t2v_{side}_noise.safetensors")
        save_file(sd, str(folder / names[-1]))
    loras = write_pair(
        server.base_dir / "models" / "loras", model, "srvwan", seed=50, ranges=("875,1000", "0,875")
    )
    return names[0], names[1], *loras


def _pair_prompt(experts, lora_high: str, lora_low: str, mode: str = "patch weights") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": experts[0], "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": experts[1], "weight_dtype": "default"}},
        "3": {"class_type": "LoraFoundry_WanLoraPair", "inputs": {
            "model_high": ["1", 0], "model_low": ["2", 0], "lora_high": lora_high, "strength_high": 1.0,
            "lora_low": lora_low, "strength_low": 0.5, "apply_mode": mode}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
    }  # fmt: skip


def test_wan_pair_applies_and_refuses_a_swap(server, object_info):
    assert object_info["LoraFoundry_WanLoraPair"]["display_name"] == "Wan 2.2 LoRA Pair (Foundry)"
    high_model, low_model, high, low = _write_experts(server)
    server.get("/object_info/LoraFoundry_WanLoraPair")  # the new files listed
    for mode in ("patch weights", "bypass"):
        report = server.run(_pair_prompt((high_model, low_model), high, low, mode), timeout=900)["outputs"][
            "4"
        ]
        text = report["text"][0]
        assert f"{high}: high-noise (trained on timesteps 875-1000)" in text, text
        assert f"{low}: low-noise (trained on timesteps 0-875)" in text and "matched: unet" in text, text
    with pytest.raises(PromptFailed) as e:
        server.run(_pair_prompt((high_model, low_model), low, high), timeout=900)
    (err,) = [d for kind, d in e.value.entry["status"]["messages"] if kind == "execution_error"]
    assert err["node_type"] == "LoraFoundry_WanLoraPair"
    assert (
        err["exception_message"].startswith("[Wan 2.2 LoRA Pair] lora_high / stack_high:")
        and low in err["exception_message"]
    )
    assert server.proc.poll() is None
