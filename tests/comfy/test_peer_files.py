"""LoRA files written by peer tools (LyCORIS, PEFT / diffusers), loaded with Load LoRA.

The peer networks are built on tiny diffusers / transformers models holding the very weights
of the tiny ComfyUI SD1.5 model (tests/peer_models.py), so three answers can be compared:
ours, ComfyUI core's, and the peer's own merged weight.
"""

from __future__ import annotations

import copy
import json
import re

import comfy.sd
import peer_models
import pytest
import torch
from patch_compare import assert_same, patched, write
from safetensors.torch import load_file, save_file

from lora_foundry.nodes.load_lora import LoadLora

lycoris_kohya = pytest.importorskip("lycoris.kohya")
peft = pytest.importorskip("peft")

# LyCORIS's classic "full" preset for SD1.x. Its built-in "full" (4.1.3) also targets the
# TimestepEmbedding class and then names time_embedding.linear_1 twice ("duplicated lora name").
LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
LYCORIS_KINDS = {
    "lora": {"algo": "lora"},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": 4},
    "dora": {"algo": "lora", "dora_wd": True},  # LyCORIS's default: magnitude per output row
    "dora_in": {"algo": "lora", "dora_wd": True, "wd_on_output": False},  # per input column
    "oft": {"algo": "diag-oft"},
    "oft_rescaled": {"algo": "diag-oft", "rescaled": True},
    "boft": {"algo": "boft"},  # butterflies of up to 9 levels on these widths
    "boft_rescaled": {"algo": "boft", "rescaled": True},
    "glora": {"algo": "glora"},
    "full": {"algo": "full"},  # the whole difference (diff, diff_b)
    "ia3": {"algo": "ia3"},  # ComfyUI core does not read (IA)^3; this pack does
    "dylora": {"algo": "dylora", "block_size": 2},  # saved as a plain LoRA of the full rank
    "norms": {"algo": "lora", "train_norm": True},  # and the norm layers' w_norm / b_norm
}
CORE_CANNOT_READ = {"ia3"}
# DyLoRA's forward samples a rank at random on every call; its file is a plain full-rank LoRA,
# which every loader reads the same way: compared with core only.
NO_DETERMINISTIC_FORWARD = {"dylora"}
# ComfyUI core normalises an output-axis DoRA by the norm of the ORIGINAL weight; LyCORIS by the
# norm of weight + delta. We follow core on purpose (lora_core.adapters._dora), so this kind
# differs from LyCORIS's own forward (max abs diff about 0.06 on these tiny weights).
CORE_DORA_QUIRK = pytest.mark.xfail(
    strict=True, reason="core's DoRA norm on the output axis uses the original weight; LyCORIS does not"
)
# ComfyUI core reads a diag-OFT's ``rescale`` and ignores it (it applies a BOFT's); we follow core,
# so a rescaled diag-OFT differs from LyCORIS's own forward by the rescale.
CORE_OFT_RESCALE_QUIRK = pytest.mark.xfail(
    strict=True, reason="core ignores a diag-OFT's rescale; LyCORIS applies it"
)
CORE_QUIRKS = {"dora": CORE_DORA_QUIRK, "oft_rescaled": CORE_OFT_RESCALE_QUIRK}
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def peer(sd15):
    """Diffusers UNet and transformers CLIP holding the weights of the sd15 fixture."""
    return peer_models.sd15_peers(sd15)


def run_ours(models, name, sm, sc):
    model, clip, _, report = LoadLora().execute(models.model, name, sm, sc, clip=models.clip)["result"]
    return model, clip, report


def matched_count(report: str) -> int:
    line = next(x for x in report.splitlines() if x.startswith("matched:"))
    return sum(int(n) for n in re.findall(r"\d+", line))


def module_paths(*roots) -> dict[int, tuple[str, str]]:
    """id(module) -> (part, path) for the peer models' modules."""
    out = {}
    for part, root in roots:
        for path, mod in root.named_modules():
            out[id(mod)] = (part, path)
    return out


# --- LyCORIS ------------------------------------------------------------------------------


def perturb_lycoris_(network, seed: int) -> None:
    """Random factors (LyCORIS starts with a zero up/w2 so the network does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("dora_scale"):  # starts as the weight's norm; move it off
                p.mul_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def lycoris_files(sd15, loras_dir, tmp_path_factory):
    """kind -> (file name, network, its peer models), each file saved by LyCORIS's save_weights."""
    preset = tmp_path_factory.mktemp("lycoris") / "sd1_full.toml"
    preset.write_text(LYCORIS_PRESET)
    out = {}
    for seed, (kind, kw) in enumerate(LYCORIS_KINDS.items()):
        # apply_to hooks the peer models' forwards: a fresh pair per network
        unet, te = peer_models.sd15_peers(sd15)
        net = lycoris_kohya.create_network(1.0, 4, 2, None, te, unet, preset=str(preset), **kw)
        net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
        perturb_lycoris_(net, seed)
        name = f"lycoris_{kind}.safetensors"
        net.save_weights(str(loras_dir / name), torch.float32, {"ss_base_model_version": "sd_v1"})
        out[kind] = (name, net, (unet, te))
    return out


def lycoris_truth(models, peer, net) -> dict[str, torch.Tensor]:
    """ComfyUI key -> the effective weight of each LyCORIS module, Linear and Conv2d (multiplier 1).

    Read off the module's own forward on unit inputs (peer_models.effective_weight), the
    computation LyCORIS trains and infers with. Not its get_merged_weight / merge_to: in
    lycoris-lora 4.1.3 those apply alpha/rank twice for LoHa and LoKr.
    """
    unet, te = peer
    paths = module_paths(("unet", unet), ("te", te))
    out = {}
    net.eval()
    for lora in net.loras:
        org = lora.org_module[0]
        if not isinstance(org, (torch.nn.Linear, torch.nn.Conv2d)):
            continue  # norm layers (w_norm, b_norm) are compared with core
        # less the bias: LyCORIS's "full" holds its own, changed one
        out[peer_models.comfy_weight_key(models, *paths[id(org)])] = peer_models.effective_weight(lora, org)
    return out


@pytest.mark.parametrize("kind", list(LYCORIS_KINDS))
def test_lycoris_file_every_module_applied_and_equal_to_core_where_core_reads_it(
    sd15, lycoris_files, loras_dir, kind
):
    name, net, _ = lycoris_files[kind]
    m, c, report = run_ours(sd15, name, 0.8, -0.6)
    assert "NOT applied" not in report and "unknown keys" not in report, report
    weights = [k for k in (*m.patches, *c.patcher.patches) if k.endswith(".weight")]  # "full" adds biases
    assert matched_count(report) == len(net.loras) == len(weights)
    cm, cc = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, load_file(loras_dir / name), 0.8, -0.6)
    if kind in CORE_CANNOT_READ:  # the gap this pack closes; compared with LyCORIS's own forward below
        assert not cm.patches and not cc.patcher.patches
        return
    assert_same(patched(m), patched(cm))
    assert_same(patched(c), patched(cc))


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(k, marks=CORE_QUIRKS[k]) if k in CORE_QUIRKS else k
        for k in LYCORIS_KINDS
        if k not in NO_DETERMINISTIC_FORWARD
    ],
)
def test_lycoris_file_equals_lycoris_own_forward(sd15, lycoris_files, kind):
    name, net, peer = lycoris_files[kind]
    m, c, _ = run_ours(sd15, name, 1.0, 1.0)
    truth = lycoris_truth(sd15, peer, net)
    assert len(truth) > 100
    ours = {k: w for k, w in {**patched(m), **patched(c)}.items() if k in truth}
    assert_same(ours, truth)


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_lycoris_wrapper_file_as_simpletuner_writes_it(sd15, loras_dir, monkeypatch, algo):
    """LyCORIS's own wrapper (what SimpleTuner trains with) names modules ``lycoris_<diffusers
    path>``: every module applied, equal to core and to the wrapper network's own forward."""
    wrapper = pytest.importorskip("lycoris.wrapper")
    monkeypatch.setattr(wrapper.LycorisNetwork, "TARGET_REPLACE_MODULE", ["Attention", "FeedForward"])
    unet, te = peer_models.sd15_peers(sd15)
    net = wrapper.create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, factor=4)
    net.apply_to()
    perturb_lycoris_(net, 40)
    name = f"simpletuner_{algo}.safetensors"
    net.save_weights(str(loras_dir / name), torch.float32, {})
    sd = load_file(loras_dir / name)
    assert all(k.startswith("lycoris_") for k in sd)
    m, _, report = run_ours(sd15, name, 0.8, 1.0)
    assert "NOT applied" not in report and "unknown keys" not in report, report
    assert matched_count(report) == len(net.loras) == len(m.patches) > 50
    cm, _ = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, sd, 0.8, 1.0)
    assert_same(patched(m), patched(cm))
    m, _, _ = run_ours(sd15, name, 1.0, 1.0)
    truth = lycoris_truth(sd15, (unet, te), net)
    assert_same({k: w for k, w in patched(m).items() if k in truth}, truth)


def test_ia3_scaled_on_the_input_as_lycoris_computes_it(sd15, loras_dir):
    """(IA)^3 modules that scale their input (what LyCORIS's ia3 preset does to the feed-forward
    output layers), built with LyCORIS's own IA3Module: ours equals the module's forward."""
    from lycoris.modules.ia3 import IA3Module

    unet, te = peer_models.sd15_peers(sd15)
    g = torch.Generator().manual_seed(50)
    picked = [("unet", p, m) for p, m in unet.named_modules() if p.endswith(("ff.net.2", "attn1.to_k"))]
    picked += [("te", p, m) for p, m in te.named_modules() if p.endswith(("mlp.fc2", "self_attn.v_proj"))]
    sd, nets = {}, []
    for part, path, org in picked:
        name = ("lora_unet_" if part == "unet" else "lora_te_") + path.replace(".", "_")
        on_input = path.endswith(("ff.net.2", "mlp.fc2"))
        module = IA3Module(name, org, 1.0, train_on_input=on_input)
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.3)
        module.apply_to()
        nets.append(module)
        sd |= {f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    assert {int(v) for k, v in sd.items() if k.endswith(".on_input")} == {0, 1}
    name = write(loras_dir, "ia3_on_input.safetensors", sd)
    m, c, report = run_ours(sd15, name, 1.0, 1.0)
    assert "(IA)3" in report and "NOT applied" not in report and "unknown keys" not in report, report
    paths = module_paths(("unet", unet), ("te", te))
    truth = {}
    for module in nets:
        org = module.org_module[0]
        truth[peer_models.comfy_weight_key(sd15, *paths[id(org)])] = peer_models.effective_weight(module, org)
    assert_same({**patched(m), **patched(c)}, truth)


def test_lycoris_modules_cover_convs_attention_and_clip(lycoris_files):
    """The files exercise every layer kind LyCORIS adapts on SD1.x, not attention alone."""
    _, net, _ = lycoris_files["lora"]
    names = {lora.lora_name for lora in net.loras}
    for wanted in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",  # 3x3 conv
        "lora_unet_down_blocks_0_attentions_0_proj_in",  # 1x1 conv
        "lora_unet_conv_in",
        "lora_unet_time_embedding_linear_1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert wanted in names


# --- PEFT / diffusers ---------------------------------------------------------------------


def random_peft_lora(peer, config, seed: int):
    """A PeftModel around a copy of the peer UNet with random LoRA A and B (PEFT starts B at zero)
    and, for DoRA, magnitudes moved off the weight's row norms PEFT starts them at."""
    model = peft.get_peft_model(copy.deepcopy(peer[0]), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
            elif ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def peft_unet(peer):
    """LoRA on attention."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGETS, init_lora_weights=False)
    return random_peft_lora(peer, config, 21)


def peft_to_kohya(sd: dict[str, torch.Tensor], prefix: str, rank: int) -> dict[str, torch.Tensor]:
    """The same factors under kohya names, which core reads for every UNet layer."""
    out = {}
    for key, t in sd.items():
        path, ab = re.fullmatch(re.escape(prefix) + r"(.*)\.lora_([AB])\.weight", key).groups()
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.lora_{'down' if ab == 'A' else 'up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def peft_truth(models, peft_model) -> dict[str, torch.Tensor]:
    """ComfyUI key -> weight after PEFT's own merge_and_unload, for the weights LoRA touches."""
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    umap = peer_models.unet_key_to_comfy(models)
    return {
        umap[k]: v.float() for k, v in merged.items() if k.endswith(".weight") and k.split(".")[-2] in
        ("to_q", "to_k", "to_v", "0") and ".attn" in k
    }  # fmt: skip


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_peft_unet_lora_equal_core_on_kohya_names_and_peft_merge(sd15, peft_unet, loras_dir, layout):
    from diffusers import StableDiffusionPipeline

    sd = peft.get_peft_model_state_dict(peft_unet)  # keys "base_model.model.<path>.lora_A.weight"
    assert sd and all(k.startswith("base_model.model.") for k in sd)
    n_modules = len(sd) // 2
    if layout == "diffusers":
        unet_sd = {k[len("base_model.model.") :]: v for k, v in sd.items()}
        folder = loras_dir / "diffusers_peft"
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_sd, safe_serialization=True)
        name, prefix = "diffusers_peft/pytorch_lora_weights.safetensors", "unet."
    else:
        name, prefix = "peft_raw.safetensors", "base_model.model."
        save_file({k: v.contiguous() for k, v in sd.items()}, str(loras_dir / name))
    written = load_file(loras_dir / name)
    assert all(k.startswith(prefix) for k in written)

    m, c, report = run_ours(sd15, name, 0.8, -0.6)
    assert "NOT applied" not in report, report
    assert matched_count(report) == n_modules == len(m.patches) and not c.patcher.patches
    core, _ = comfy.sd.load_lora_for_models(sd15.model, None, peft_to_kohya(written, prefix, 4), 0.8, 0)
    assert_same(patched(m), patched(core))

    m1, _, _ = run_ours(sd15, name, 1.0, 1.0)
    assert_same(patched(m1), peft_truth(sd15, peft_unet))


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_header_alpha_scales_as_diffusers_loads(sd15, peer, loras_dir, rslora):
    """A diffusers file whose header carries its PEFT config (lora_alpha 8 at rank 4, to_v at 2 by
    alpha_pattern, rsLoRA or not) equals PEFT's merge; core ignores the header (scale 1)."""
    from diffusers import StableDiffusionPipeline

    config = peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_v": 2}, use_rslora=rslora,
                             target_modules=PEFT_TARGETS, init_lora_weights=False)  # fmt: skip
    model = random_peft_lora(peer, config, 24)
    unet_sd = {k[len("base_model.model.") :]: v for k, v in peft.get_peft_model_state_dict(model).items()}
    folder = loras_dir / f"diffusers_alpha_{rslora}"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_sd, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    name = f"diffusers_alpha_{rslora}/pytorch_lora_weights.safetensors"
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert f"{len(unet_sd) // 2} modules scaled by the lora_alpha" in report, report
    truth = peft_truth(sd15, model)
    assert_same(patched(m), truth)
    core, _ = comfy.sd.load_lora_for_models(
        sd15.model, None, peft_to_kohya(load_file(loras_dir / name), "unet.", 4), 1.0, 0
    )
    assert any((patched(core)[k] - v).abs().max() > 1e-3 for k, v in truth.items())


def test_peft_saved_folder_takes_alpha_from_its_adapter_config(sd15, peer, loras_dir):
    """A folder PEFT's save_pretrained wrote (adapter_model.safetensors + adapter_config.json,
    lora_alpha 8 at rank 4): equal to PEFT's merge; an edited config is read again; a broken one
    leaves the file at scale 1, as core reads it."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)
    model = random_peft_lora(peer, config, 25)
    folder = loras_dir / "peft_folder"
    model.save_pretrained(folder, safe_serialization=True)
    name = "peft_folder/adapter_model.safetensors"
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert "adapter_config.json beside the file" in report, report
    assert_same(patched(m), peft_truth(sd15, model))

    written = load_file(loras_dir / name)
    at_scale_1, _ = comfy.sd.load_lora_for_models(
        sd15.model, None, peft_to_kohya(written, "base_model.model.", 4), 1.0, 0
    )
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(settings | {"lora_alpha": 4}))
    assert_same(patched(run_ours(sd15, name, 1.0, 1.0)[0]), patched(at_scale_1))
    (folder / "adapter_config.json").write_text("{broken")
    m, _, report = run_ours(sd15, name, 1.0, 1.0)
    assert "adapter_config" not in report
    assert_same(patched(m), patched(at_scale_1))


# --- PEFT OFT (v2) ---------------------------------------------------------------------------

PEFT_OFT_TARGETS = [*PEFT_TARGETS, "conv1"]  # attention linears and the resnets' 3x3 convs


@pytest.fixture(scope="module", params=[False, True], ids=["per_block", "block_share"])
def peft_oft_unet(peer, request):
    """A PeftModel around a copy of the peer UNet, PEFT OFT (blocks of 4) with random rotations."""
    config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=PEFT_OFT_TARGETS, block_share=request.param)
    model = peft.get_peft_model(copy.deepcopy(peer[0]), config)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".oft_R." in name:  # PEFT starts from the identity (zeros)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_file_equals_its_merge(
    models, peft_model, loras_dir, name: str, layout: str, marker: str, label: str
):
    """Saves a PeftModel's adapter under PEFT (``base_model.model.``) or diffusers (``unet.``) names
    and loads it with Load LoRA: PEFT's own merge_and_unload at strength 1, W + s (merged - W) at
    s = 0.4, on every module holding ``marker`` (linear and conv layers both among them)."""
    sd = peft.get_peft_model_state_dict(peft_model)
    markers = [k for k in sd if marker in k]
    assert markers and all(k.startswith("base_model.model.") for k in sd)
    prefix = "base_model.model." if layout == "peft" else "unet."
    written = {prefix + k[len("base_model.model.") :]: v.contiguous() for k, v in sd.items()}
    save_file(written, str(loras_dir / name))

    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    umap = peer_models.unet_key_to_comfy(models)
    touched = {k[len("base_model.model.") :].split(marker)[0] + ".weight" for k in markers}
    truth = {umap[k]: merged[k].float() for k in touched}
    assert any(t.dim() == 4 for t in truth.values()) and any(t.dim() == 2 for t in truth.values())

    m, c, report = run_ours(models, name, 1.0, 1.0)
    assert label in report and "NOT applied" not in report, report
    assert matched_count(report) == len(markers) == len(m.patches) and not c.patcher.patches
    assert_same(patched(m), truth)

    base = models.model.model.state_dict()
    part, _, _ = run_ours(models, name, 0.4, 0.0)
    assert_same(patched(part), {k: base[k].float() + 0.4 * (v - base[k].float()) for k, v in truth.items()})
    return sd


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_peft_oft_equals_peft_merge(sd15, peft_oft_unet, loras_dir, layout, request):
    """PEFT's OFT file (``oft_R``), which core 0.3.75 does not read."""
    name = f"peft_oft_{request.node.callspec.id}.safetensors"
    sd = peft_file_equals_its_merge(sd15, peft_oft_unet, loras_dir, name, layout, ".oft_R.weight", "PEFT OFT")
    assert all(k.endswith(".oft_R.weight") for k in sd)


# --- PEFT DoRA ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dora_unet(peer):
    """DoRA on attention linears and 3x3 convs."""
    config = peft.LoraConfig(
        r=4, lora_alpha=4, use_dora=True, target_modules=PEFT_OFT_TARGETS, init_lora_weights=False
    )
    return random_peft_lora(peer, config, 23)


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_peft_dora_equals_peft_merge(sd15, peft_dora_unet, loras_dir, layout):
    """PEFT's DoRA (``lora_magnitude_vector``), which core 0.3.75 drops (it applies the plain LoRA part)."""
    name = f"peft_dora_{layout}.safetensors"
    marker = ".lora_magnitude_vector"
    sd = peft_file_equals_its_merge(sd15, peft_dora_unet, loras_dir, name, layout, marker, "(DoRA), rank 4")
    assert len(sd) == 3 * sum(marker in k for k in sd)  # A, B and the magnitude of each module
