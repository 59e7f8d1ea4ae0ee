"""Text-encoder LoRAs written under transformers 5 (no ``text_model`` level), issue #21.

The files come from the peer tools themselves (tests/te_peer.py): diffusers' ``save_lora_weights``
and PEFT's ``save_pretrained`` on PEFT-wrapped transformers CLIP text encoders, once with the test
environment's transformers 5 and once, with the very same factors, in a cached venv with
transformers 4; LyCORIS writes the kohya rendering. Each transformers 5 file must load with every
module applied, the report naming the naming it read, and give the weights of the transformers 4
file, which ComfyUI core reads, as core does (core reads none of the transformers 5 modules).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import comfy.sd
import model_factory
import pytest
import te_peer
import torch
from patch_compare import assert_same, patched
from safetensors.torch import load_file, save_file

from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.merge import MergeLoras, ResizeLora

pytest.importorskip("peft")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5, reason="the test environment must have transformers 5"
)

RANK = 4
MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
NOTE = "named as transformers 5 writes them"


def encoder_spec(component: str, cls: str, sizes: tuple[int, int], heads: int, alpha: float = RANK, **kw):
    hidden, layers = sizes
    return dict(component=component, cls=cls, hidden=hidden, layers=layers, heads=heads, rank=RANK, alpha=alpha,
                **kw)  # fmt: skip


def random_factors(path, specs: list[dict], seed: int):
    """lora_A (rank, in) and lora_B (out, rank) for every CLIP linear of every encoder, saved to ``path``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in specs:
        h = spec["hidden"]
        for layer in range(spec["layers"]):
            for module in MODULES:
                n_in, n_out = {"mlp.fc1": (h, 4 * h), "mlp.fc2": (4 * h, h)}.get(module, (h, h))
                key = f"{spec['component']}.layers.{layer}.{module}"
                out[key + ".lora_A"] = torch.randn(RANK, n_in, generator=g) * 0.2
                out[key + ".lora_B"] = torch.randn(n_out, RANK, generator=g) * 0.2
    save_file(out, str(path))
    return path


def peer_specs() -> dict[str, tuple[dict, int]]:
    """Every file the tests need, by tag: (what the peer tools write, the seed of its factors)."""
    s, x = model_factory.SD15_TINY, model_factory.SDXL_TINY
    clip_l = encoder_spec("text_encoder", "CLIPTextModel", (s.clip_l_hidden, s.clip_l_layers), s.heads)
    xl_l = encoder_spec("text_encoder", "CLIPTextModel", (x.clip_l_hidden, x.clip_l_layers), x.heads)
    specs = {
        "sd15": ({"pipeline": "StableDiffusionPipeline", "encoders": [clip_l], "peft_folders": True}, 51),
        # lora_alpha 8 at rank 4, fc2 at 2 through alpha_pattern: diffusers' header carries both
        "sd15_alpha": ({"pipeline": "StableDiffusionPipeline",
                        "encoders": [{**clip_l, "alpha": 8, "alpha_pattern": {"fc2": 2}}]}, 52),
    }  # fmt: skip
    # diffusers' SDXL pipeline holds its second encoder as CLIPTextModelWithProjection, which keeps a
    # ``text_model`` attribute under transformers 5; a trainer that builds it as a bare CLIPTextModel
    # writes ``text_encoder_2.encoder.layers...``. Both, with the first encoder flat.
    for cls in ("CLIPTextModelWithProjection", "CLIPTextModel"):
        xl_g = encoder_spec("text_encoder_2", cls, (x.clip_g_hidden, x.clip_g_layers), x.heads)
        specs[f"xl_{cls}"] = ({"pipeline": "StableDiffusionXLPipeline", "encoders": [xl_l, xl_g]}, 53)
    return specs


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """tag -> (transformers 5 folder, transformers 4 folder, the factors): the peer tools' files of
    the same factors; the transformers 4 ones all in one subprocess (cached)."""
    tmp = tmp_path_factory.mktemp("te5")
    jobs, tf5 = [], {}
    for tag, (spec, seed) in peer_specs().items():
        factors = random_factors(tmp / f"{tag}.factors.safetensors", spec["encoders"], seed)
        (tmp / tag).mkdir()
        tf5[tag] = te_peer.transformers5_files(spec, factors, tmp / tag)
        jobs.append((spec, factors))
    tf4 = dict(zip(tf5, te_peer.transformers4_files(jobs), strict=True))
    out = {}
    for (tag, folder), (_, factors) in zip(tf5.items(), jobs, strict=True):
        assert json.loads((folder / "versions.json").read_text())["transformers"].startswith("5.")
        assert json.loads((tf4[tag] / "versions.json").read_text())["transformers"].startswith("4.")
        out[tag] = (folder, tf4[tag], load_file(factors))
    return out


def install(loras_dir, src, name: str) -> str:
    """Copy a peer file (or a folder with its adapter_config.json) into models/loras."""
    dst = loras_dir / name
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return f"{name}/adapter_model.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return name


def ours(models, name: str, sc: float = 0.7):
    _, clip, _, report = LoadLora().execute(models.model, name, 1.0, sc, clip=models.clip)["result"]
    return patched(clip), report


def core(models, sd: dict, sc: float = 0.7) -> dict:
    _, clip = comfy.sd.load_lora_for_models(models.model, models.clip, sd, 1.0, sc)
    return patched(clip)


def modules_of(sd: dict) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}


def matched_clip(report: str) -> int:
    line = next(x for x in report.splitlines() if x.startswith("matched:"))
    return int(line.split("clip ")[1].split(",")[0])


# --- SD1.5: one CLIP-L ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_files(peer):
    return peer["sd15"]


@pytest.mark.timeout(300)
def test_sd15_diffusers_file_of_transformers5_equals_transformers4_file_and_core(sd15, loras_dir, sd15_files):
    tf5, tf4, _ = sd15_files
    sd5 = load_file(tf5 / "diffusers" / "pytorch_lora_weights.safetensors")
    sd4 = load_file(tf4 / "diffusers" / "pytorch_lora_weights.safetensors")
    n = model_factory.SD15_TINY.clip_l_layers * len(MODULES)
    assert len(modules_of(sd5)) == n and all(k.startswith("text_encoder.encoder.layers.") for k in sd5)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in sd4)
    assert {k.replace(".text_model.", ".") for k in sd4} == set(sd5)  # one file, two namings

    name5 = install(
        loras_dir, tf5 / "diffusers" / "pytorch_lora_weights.safetensors", "te5/sd15_tf5.safetensors"
    )
    name4 = install(
        loras_dir, tf4 / "diffusers" / "pytorch_lora_weights.safetensors", "te5/sd15_tf4.safetensors"
    )
    w5, report5 = ours(sd15, name5)
    w4, report4 = ours(sd15, name4)
    assert "NOT applied" not in report5 and matched_clip(report5) == n == len(w5), report5
    assert f"{n} text-encoder modules are {NOTE}" in report5
    assert NOTE not in report4 and matched_clip(report4) == n
    assert_same(w5, w4)
    assert_same(w5, core(sd15, sd4))
    assert core(sd15, sd5) == {}  # what the issue reports: core matches none of them


@pytest.mark.timeout(300)
def test_sd15_peft_folder_of_transformers5_equals_transformers4_and_core(sd15, loras_dir, sd15_files):
    """PEFT's save_pretrained (adapter_model.safetensors, names base_model.model.encoder.layers...,
    adapter_config.json beside it) reads as the transformers 4 folder and as core on the 4.x file."""
    tf5, tf4, _ = sd15_files
    sd5 = load_file(tf5 / "peft_text_encoder" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.encoder.layers.") for k in sd5)
    name5 = install(loras_dir, tf5 / "peft_text_encoder", "te5/peft_tf5")
    name4 = install(loras_dir, tf4 / "peft_text_encoder", "te5/peft_tf4")
    w5, report5 = ours(sd15, name5)
    w4, _ = ours(sd15, name4)
    assert "NOT applied" not in report5 and NOTE in report5 and "adapter_config.json" in report5, report5
    assert_same(w5, w4)
    assert_same(w5, core(sd15, load_file(tf4 / "diffusers" / "pytorch_lora_weights.safetensors")))


@pytest.mark.timeout(300)
def test_header_alphas_of_a_transformers5_file_scale_as_diffusers_loads(sd15, loras_dir, peer):
    """lora_alpha 8 at rank 4 and an alpha_pattern (fc2: 2) in diffusers' header apply to the flat
    names as to the 4.x ones: each weight is W + (alpha / rank) * B @ A, computed here by hand."""
    s = model_factory.SD15_TINY
    tf5, tf4, factors = peer["sd15_alpha"]
    name5 = install(
        loras_dir, tf5 / "diffusers" / "pytorch_lora_weights.safetensors", "te5/alpha_tf5.safetensors"
    )
    name4 = install(
        loras_dir, tf4 / "diffusers" / "pytorch_lora_weights.safetensors", "te5/alpha_tf4.safetensors"
    )
    w5, report5 = ours(sd15, name5, sc=1.0)
    assert "modules scaled by the lora_alpha" in report5 and NOTE in report5, report5
    base = sd15.clip.cond_stage_model.state_dict()
    truth = {}
    for layer in range(s.clip_l_layers):
        for module in MODULES:
            f = f"text_encoder.layers.{layer}.{module}"
            scale = (2 if module == "mlp.fc2" else 8) / RANK
            key = f"clip_l.transformer.text_model.encoder.layers.{layer}.{module}.weight"
            truth[key] = base[key].float() + scale * factors[f + ".lora_B"] @ factors[f + ".lora_A"]
    assert_same(w5, truth)
    assert_same(ours(sd15, name4, sc=1.0)[0], truth)


# --- SDXL: CLIP-L and CLIP-G ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["WithProjection", "CLIPTextModel"])
def sdxl_files(request, peer):
    """SDXL files whose second encoder was a CLIPTextModelWithProjection (as in diffusers' pipeline)
    or a bare CLIPTextModel (see peer_specs)."""
    return request.param, peer[
        "xl_CLIPTextModelWithProjection" if request.param == "WithProjection" else "xl_CLIPTextModel"
    ]


@pytest.mark.timeout(300)
def test_sdxl_transformers5_file_equals_transformers4_file_and_core(sdxl, loras_dir, sdxl_files):
    kind, (tf5, tf4, _) = sdxl_files
    sd5 = load_file(tf5 / "diffusers" / "pytorch_lora_weights.safetensors")
    sd4 = load_file(tf4 / "diffusers" / "pytorch_lora_weights.safetensors")
    s = model_factory.SDXL_TINY
    n1, n2 = s.clip_l_layers * len(MODULES), s.clip_g_layers * len(MODULES)
    te2_flat = kind == "CLIPTextModel"
    assert {m.split(".")[0] for m in modules_of(sd5)} == {"text_encoder", "text_encoder_2"}
    assert all(k.startswith("text_encoder.encoder.layers.") for k in sd5 if k.startswith("text_encoder."))
    te2_prefix = "text_encoder_2.encoder.layers." if te2_flat else "text_encoder_2.text_model.encoder.layers."
    assert all(k.startswith(te2_prefix) for k in sd5 if k.startswith("text_encoder_2."))
    assert all(".text_model.encoder.layers." in k for k in sd4)

    name5 = install(
        loras_dir, tf5 / "diffusers" / "pytorch_lora_weights.safetensors", f"te5/xl_{kind}_tf5.safetensors"
    )
    name4 = install(
        loras_dir, tf4 / "diffusers" / "pytorch_lora_weights.safetensors", f"te5/xl_{kind}_tf4.safetensors"
    )
    w5, report5 = ours(sdxl, name5)
    assert "NOT applied" not in report5 and matched_clip(report5) == n1 + n2 == len(w5), report5
    assert f"{n1 + (n2 if te2_flat else 0)} text-encoder modules are {NOTE}" in report5
    assert {k.split(".")[0] for k in w5} == {"clip_l", "clip_g"}
    assert_same(w5, ours(sdxl, name4)[0])
    assert_same(w5, core(sdxl, sd4))


# --- kohya renderings (LyCORIS names modules by their transformers 5 paths) ----------------------------


def lycoris_te_file(path: Path, encoders: list, factors: dict, components: list[str]) -> dict:
    """LyCORIS's kohya network on the given transformers text encoders, its LoRA factors set to
    ``factors`` (alpha = rank: scale 1, as the PEFT files), saved by LyCORIS; returns the file."""
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    te = encoders[0] if len(encoders) == 1 else encoders
    unet = torch.nn.Module()  # no UNet modules: the file holds the text encoders alone
    net = lycoris_kohya.create_network(1.0, RANK, RANK, None, te, unet, algo="lora")
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=False)  # registers the modules it saves
    paths = {id(m): (c, p) for c, e in zip(components, encoders, strict=True) for p, m in e.named_modules()}
    with torch.no_grad():
        for lora in net.loras:
            component, module_path = paths[id(lora.org_module[0])]
            layer, module = module_path.split("encoder.layers.", 1)[1].split(".", 1)
            key = f"{component}.layers.{layer}.{module}"
            lora.lora_down.weight.copy_(factors[key + ".lora_A"])
            lora.lora_up.weight.copy_(factors[key + ".lora_B"])
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, {})
    return load_file(path)


def clip_encoder(cls: str, sizes: tuple[int, int], heads: int):
    return te_peer.encoder(dict(cls=cls, hidden=sizes[0], layers=sizes[1], heads=heads))


@pytest.mark.timeout(300)
def test_kohya_names_of_transformers5_paths_load_as_core_reads_the_transformers4_file(
    sd15, sdxl, loras_dir, sd15_files, sdxl_files
):
    """lora_te_encoder_layers_... (SD1.5) and lora_te1_encoder_layers_... / lora_te2_... (SDXL), as
    LyCORIS names transformers 5 encoders, give core's weights for the diffusers 4.x file."""
    s, x = model_factory.SD15_TINY, model_factory.SDXL_TINY
    tf5, tf4, factors = sd15_files
    sd = lycoris_te_file(loras_dir / "te5" / "kohya_sd15.safetensors",
                         [clip_encoder("CLIPTextModel", (s.clip_l_hidden, s.clip_l_layers), s.heads)],
                         factors, ["text_encoder"])  # fmt: skip
    assert len(modules_of(sd)) == s.clip_l_layers * len(MODULES)
    assert all(k.startswith("lora_te_encoder_layers_") for k in sd)
    w, report = ours(sd15, "te5/kohya_sd15.safetensors")
    assert "NOT applied" not in report and NOTE in report, report
    assert_same(w, core(sd15, load_file(tf4 / "diffusers" / "pytorch_lora_weights.safetensors")))

    kind, (_, tf4_xl, factors_xl) = sdxl_files
    te2_cls = "CLIPTextModelWithProjection" if kind == "WithProjection" else "CLIPTextModel"
    encoders = [clip_encoder("CLIPTextModel", (x.clip_l_hidden, x.clip_l_layers), x.heads),
                clip_encoder(te2_cls, (x.clip_g_hidden, x.clip_g_layers), x.heads)]  # fmt: skip
    sd = lycoris_te_file(loras_dir / "te5" / f"kohya_xl_{kind}.safetensors", encoders, factors_xl,
                         ["text_encoder", "text_encoder_2"])  # fmt: skip
    assert len(modules_of(sd)) == (x.clip_l_layers + x.clip_g_layers) * len(MODULES)
    assert any(k.startswith("lora_te1_encoder_layers_") for k in sd)
    assert any(
        k.startswith("lora_te2_encoder_layers_" if kind != "WithProjection" else "lora_te2_text_model_")
        for k in sd
    )
    w, report = ours(sdxl, f"te5/kohya_xl_{kind}.safetensors")
    assert "NOT applied" not in report and NOTE in report, report
    assert_same(w, core(sdxl, load_file(tf4_xl / "diffusers" / "pytorch_lora_weights.safetensors")))


# --- Merge LoRAs and Resize LoRA -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_merge_reads_transformers5_files_and_writes_kohya_names(sd15, loras_dir, sd15_files):
    """Merging the 4.x and the 5.x diffusers file gives the same kohya file (names with text_model,
    as kohya writes them; tensors equal), which loads to the 5.x file's weights."""
    tf5, tf4, _ = sd15_files
    args = dict(conv_rank=0, density=0.5, seed=0, save_dtype="fp32", overwrite=True)
    written = {}
    for tag, folder in (("tf5", tf5), ("tf4", tf4)):
        src = install(
            loras_dir,
            folder / "diffusers" / "pytorch_lora_weights.safetensors",
            f"te5/merge_src_{tag}.safetensors",
        )
        entries = [(src, 1.0, 0.8)]
        name, _ = MergeLoras().execute(sd15.model, entries, "concat", 64, clip=sd15.clip,
                                       output_name=f"te5_merged_{tag}", **args)["result"]  # fmt: skip
        written[tag] = (name, load_file(loras_dir / name))
    (name5, sd5), (_, sd4) = written["tf5"], written["tf4"]
    assert set(sd5) == set(sd4) and all(k.startswith("lora_te_text_model_encoder_layers_") for k in sd5)
    for k in sd5:
        assert torch.equal(sd5[k], sd4[k]), k
    w5, _ = ours(sd15, "te5/merge_src_tf5.safetensors", sc=0.8)
    assert_same(ours(sd15, name5, sc=1.0)[0], w5)


@pytest.mark.timeout(300)
def test_resize_of_a_transformers5_kohya_file_writes_kohya_names(sd15, loras_dir, sd15_files):
    """Resize LoRA reads lora_te_encoder_layers_... and writes lora_te_text_model_encoder_layers_...:
    the same file as resizing the kohya names of the same factors."""
    s = model_factory.SD15_TINY
    _, _, factors = sd15_files
    sd = lycoris_te_file(loras_dir / "te5" / "resize_src_tf5.safetensors",
                         [clip_encoder("CLIPTextModel", (s.clip_l_hidden, s.clip_l_layers), s.heads)],
                         factors, ["text_encoder"])  # fmt: skip
    # the kohya file of the same factors: each module renamed as kohya names transformers 4 paths
    renamed = {
        k.replace("lora_te_encoder_layers_", "lora_te_text_model_encoder_layers_"): v for k, v in sd.items()
    }
    save_file(renamed, str(loras_dir / "te5" / "resize_src_tf4.safetensors"))
    out = {}
    for tag in ("tf5", "tf4"):
        name, report = ResizeLora().execute(f"te5/resize_src_{tag}.safetensors", "fixed", 2, 0.9, "fp32",
                                            f"te5_resized_{tag}", True)["result"]  # fmt: skip
        out[tag] = load_file(loras_dir / name)
    assert set(out["tf5"]) == set(out["tf4"]) == set(renamed)
    for k, v in out["tf4"].items():
        assert torch.equal(out["tf5"][k], v), k
    assert {t.shape[0] for k, t in out["tf5"].items() if k.endswith("lora_down.weight")} == {2}
