"""Files this pack writes, read by other tools.

A merged LoRA (Merge LoRAs, with LoCon convs) and a trained one (Train LoRA, UNet and text
encoder) are loaded by:
- LyCORIS's kohya reader (``create_network_from_weights``), which reads kohya files the way
  sd-scripts and the A1111/Forge networks do: by ``lora_unet_`` / ``lora_te_`` names built from
  diffusers / transformers module paths, with ``alpha / rank`` scaling;
- diffusers (``lora_state_dict`` converts kohya files, ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder`` inject them with PEFT, ``fuse_lora`` bakes them in).
Each must take every module of the file and give the weights this pack's Load LoRA gives.
An SDXL merge (SGM UNet paths, two text encoders) is read by diffusers' SDXL loader too.
"""

from __future__ import annotations

import lora_factory as lf
import peer_models
import pytest
import torch
from patch_compare import assert_same, modules, patched, write
from safetensors.torch import load_file

from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.merge import MergeLoras

lycoris_kohya = pytest.importorskip("lycoris.kohya")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["merged", "trained"])
def written(request, sd15, loras_dir):
    """A file this pack wrote: two LoRAs with LoCon convs merged by concat (Merge LoRAs), or a
    LoRA on the UNet's attention and feed-forward layers and the text encoder (Train LoRA)."""
    if request.param == "trained":
        import train_run

        request.getfixturevalue("dataset_dir")
        dataset, _ = train_run.make_dataset(sd15)
        out = train_run.train(
            sd15, dataset, output_name="interop_trained", te_lr=1e-3, targets="attention_ff"
        )
        return out["result"][2]
    mods = modules(sd15, convs=True)
    write(loras_dir, "interop_a.safetensors", lf.kohya_lora(lf.random_factors(mods, rank=4, seed=71)))
    write(loras_dir, "interop_b.safetensors", lf.kohya_lora(lf.random_factors(mods, rank=2, seed=72)))
    entries = [("interop_a.safetensors", 0.8, 0.5), ("interop_b.safetensors", -0.6, 1.1)]
    args = dict(
        conv_rank=0, density=0.5, seed=0, save_dtype="fp32", output_name="interop_merged", overwrite=True
    )
    name, _ = MergeLoras().execute(sd15.model, entries, "concat", 64, clip=sd15.clip, **args)["result"]
    return name


def ours(sd15, name) -> dict[str, torch.Tensor]:
    """ComfyUI key -> weight after this pack's Load LoRA at strength 1."""
    m, c, _, _ = LoadLora().execute(sd15.model, name, 1.0, 1.0, clip=sd15.clip)["result"]
    return {**patched(m), **patched(c)}


def file_modules(sd: dict) -> set[str]:
    return {k.split(".", 1)[0] for k in sd}


def test_lycoris_kohya_reader_takes_every_module_with_our_weights(sd15, loras_dir, written, monkeypatch):
    # The reader first builds a default network, which in lycoris-lora 4.1.3 names
    # time_embedding.linear_1 twice and fails; name targets play no part in reading a file.
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    path = loras_dir / written
    sd = load_file(path)
    unet, te = peer_models.sd15_peers(sd15)
    net, weights_sd = lycoris_kohya.create_network_from_weights(
        1.0, str(path), None, te, unet, for_inference=False
    )
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    missing, unexpected = net.load_state_dict(weights_sd, strict=False)
    assert not unexpected, unexpected[:5]
    names = {lora.lora_name for lora in net.loras}
    assert names == file_modules(sd), sorted(file_modules(sd) - names)[:5]  # every module taken
    paths = {}
    for part, root in (("unet", unet), ("te", te)):
        for p, mod in root.named_modules():
            paths[id(mod)] = (part, p)
    expected = ours(sd15, written)
    theirs = {}
    net.eval()
    for lora in net.loras:
        org = lora.org_module[0]
        theirs[peer_models.comfy_weight_key(sd15, *paths[id(org)])] = peer_models.effective_weight(lora, org)
    if "merged" in written:
        assert any(w.dim() == 4 and w.shape[-1] == 3 for w in theirs.values()), "no 3x3 conv compared"
    assert_same(theirs, expected)


def test_diffusers_loads_and_fuses_it_to_our_weights(sd15, loras_dir, written):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(loras_dir / written))
    unet, te = peer_models.sd15_peers(sd15)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="ours")
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state_dict, alphas, text_encoder=te.text_model, prefix="text_encoder", adapter_name="ours"
    )
    unet.fuse_lora(adapter_names=["ours"])
    fuse_text_encoder_lora(te.text_model, adapter_names=["ours"])

    theirs = {}  # every layer diffusers wrapped (its weight now under base_layer), fused
    for part, model in (("unet", unet), ("te", te)):
        for key, w in model.state_dict().items():
            if key.endswith(".base_layer.weight"):
                path = key[: -len(".base_layer.weight")]
                theirs[peer_models.comfy_weight_key(sd15, part, path)] = w.float()
    expected = ours(sd15, written)
    assert_same(theirs, expected)


def test_diffusers_reads_an_sdxl_merge_named_as_sd_scripts_names_it(sdxl, loras_dir):
    """SDXL files carry the SGM UNet paths (lora_unet_input_blocks_...) and lora_te1_ / lora_te2_;
    diffusers' SDXL loader maps them onto its UNet and both text encoders, to our weights."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    mods = modules(sdxl, convs=True)
    for name, seed in (("interop_xl_a.safetensors", 73), ("interop_xl_b.safetensors", 74)):
        write(loras_dir, name, lf.kohya_lora(lf.random_factors(mods, rank=4, seed=seed), sdxl=True))
    entries = [("interop_xl_a.safetensors", 0.8, 0.5), ("interop_xl_b.safetensors", -0.6, 1.1)]
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype="fp32", output_name="interop_xl", overwrite=True)
    name, _ = MergeLoras().execute(sdxl.model, entries, "concat", 64, clip=sdxl.clip, **args)["result"]
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(loras_dir / name))

    unet, te1, te2 = peer_models.sdxl_peers(sdxl)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(loras_dir / name), unet_config=unet.config
    )
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="ours")
    for te, prefix in ((te1, "text_encoder"), (te2, "text_encoder_2")):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            state_dict, alphas, text_encoder=te, prefix=prefix, adapter_name="ours"
        )
        fuse_text_encoder_lora(te, adapter_names=["ours"])
    unet.fuse_lora(adapter_names=["ours"])

    umap = peer_models.unet_key_to_comfy(sdxl)
    to_comfy = {"unet": umap.__getitem__, "te1": peer_models.sdxl_clip_key_to_comfy(te1, "clip_l"),
                "te2": peer_models.sdxl_clip_key_to_comfy(te2, "clip_g")}  # fmt: skip
    theirs = {}  # every layer diffusers wrapped (its weight now under base_layer), fused
    for part, model in (("unet", unet), ("te1", te1), ("te2", te2)):
        for key, w in model.state_dict().items():
            if key.endswith(".base_layer.weight"):
                theirs[to_comfy[part](key.replace(".base_layer", ""))] = w.float()
    assert any(k.startswith("clip_g.") for k in theirs) and any(k.startswith("clip_l.") for k in theirs)
    assert any(w.dim() == 4 and w.shape[-1] == 3 for w in theirs.values()), "no 3x3 conv compared"
    assert_same(theirs, ours(sdxl, name))
