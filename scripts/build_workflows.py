"""Writes the example workflows in workflows/ (UI graph format, as the frontend saves them).

The graphs are described compactly here and expanded into nodes, slots and links, so that the
shipped JSON stays consistent; tests check that the committed files equal this output.

    python scripts/build_workflows.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = "lora_foundry_demo_sd15.safetensors"
DEMO_LORA = "lora_foundry_demo_lora.safetensors"
DEMO_LORA_B = "lora_foundry_demo_lora_b.safetensors"
DEMO_TAGGER = "lora_foundry_demo_tagger/model.onnx"
DEMO_DATASET = "lora_foundry_demo_dataset"
DEMO_FLUX = "lora_foundry_demo_flux.safetensors"  # models/diffusion_models (scripts/make_demo_models.py)
DEMO_FLUX_VAE = "lora_foundry_demo_flux_vae.safetensors"  # models/vae
DEMO_CLIP_L = "lora_foundry_demo_clip_l.safetensors"  # models/text_encoders: the demo checkpoint's CLIP-L


@dataclass
class N:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list = field(default_factory=list)
    inputs: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name -> (src id, slot, type)
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    title: str | None = None
    size: tuple[int, int] = (315, 130)
    widget_inputs: tuple[str, ...] = ()  # inputs above that replace a widget of the same name


def note(id: int, pos: tuple[int, int], text: str) -> N:
    return N(id, "Note", pos, widgets=[text], size=(380, 200))


def expand(nodes: list[N]) -> dict:
    links, link_id = [], 0
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for n in nodes:
        ui_inputs = []
        for name, (src, slot, typ) in n.inputs.items():
            link_id += 1
            links.append([link_id, src, slot, n.id, len(ui_inputs), typ])
            out_links.setdefault((src, slot), []).append(link_id)
            entry = {"name": name, "type": typ, "link": link_id}
            if name in n.widget_inputs:
                entry["widget"] = {"name": name}
            ui_inputs.append(entry)
        ui_nodes.append((n, ui_inputs))
    result = []
    for order, (n, ui_inputs) in enumerate(ui_nodes):
        node = {
            "id": n.id,
            "type": n.type,
            "pos": list(n.pos),
            "size": list(n.size),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": ui_inputs,
            "outputs": [
                {"name": name, "type": typ, "slot_index": i, "links": out_links.get((n.id, i), [])}
                for i, (name, typ) in enumerate(n.outputs)
            ],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": n.widgets,
        }
        if n.title:
            node["title"] = n.title
        result.append(node)
    return {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": link_id,
        "nodes": result,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def _sampling_tail(model: tuple[int, int], clip: tuple[int, int], vae: tuple[int, int], start: int, x: int,
                   prompt: str, prefix: str) -> list[N]:  # fmt: skip
    """Prompt encoders, a 64x64 latent, KSampler (2 steps), decode and save."""
    p, neg, lat, ks, dec, save = range(start, start + 6)
    return [
        N(p, "CLIPTextEncode", (x, 0), [prompt], {"clip": (*clip, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
        N(neg, "CLIPTextEncode", (x, 200), ["blurry"], {"clip": (*clip, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
        N(lat, "EmptyLatentImage", (x, 400), [64, 64, 1], {}, [("LATENT", "LATENT")]),
        N(ks, "KSampler", (x + 350, 0), [42, "fixed", 2, 7.0, "euler", "normal", 1.0],
          {"model": (*model, "MODEL"), "positive": (p, 0, "CONDITIONING"), "negative": (neg, 0, "CONDITIONING"),
           "latent_image": (lat, 0, "LATENT")}, [("LATENT", "LATENT")], size=(315, 262)),
        N(dec, "VAEDecode", (x + 700, 0), [], {"samples": (ks, 0, "LATENT"), "vae": (*vae, "VAE")}, [("IMAGE", "IMAGE")],
          size=(260, 80)),
        N(save, "SaveImage", (x + 1000, 0), [prefix], {"images": (dec, 0, "IMAGE")}, []),
    ]  # fmt: skip


def load_lora_workflow() -> dict:
    nodes = [
        note(1, (0, -260), "Load one LoRA onto MODEL and CLIP.\n\nThe demo checkpoint has random weights, so the "
             "image is noise. For real use pick your own checkpoint in 'Load Checkpoint' and a LoRA made for the "
             "same base model (SD1.5 with SD1.5, SDXL with SDXL) in 'Load LoRA (Foundry)'. The 'report' output "
             "says how many of the LoRA's layers matched the model; 'trigger words' lists the words the LoRA was "
             "trained with. Raise the KSampler steps and the latent size for real images."),
        N(2, "CheckpointLoaderSimple", (0, 0), [DEMO_CHECKPOINT], {},
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
        N(3, "LoraFoundry_LoadLora", (350, 0), [DEMO_LORA, 1.0, 1.0, "", "patch weights"],
          {"model": (2, 0, "MODEL"), "clip": (2, 1, "CLIP")},
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("trigger_words", "STRING"), ("report", "STRING")], size=(340, 180)),
        *_sampling_tail((3, 0), (3, 1), (2, 2), 10, 750, "foundrystyle, a lighthouse at dusk", "lora_foundry/load_lora"),
    ]  # fmt: skip
    return expand(nodes)


CAPTION_OUTPUTS = [("captions", "STRING"), ("summary", "STRING"), ("previews", "IMAGE"), ("folder", "STRING")]


def prepare_node(id: int, pos: tuple[int, int], folder: str = "lora_foundry_demo_prepared") -> N:
    return N(id, "LoraFoundry_PrepareImages", pos,
             [DEMO_DATASET, folder, "buckets", 256, 1024, 1024, "crop", "png", True, False, True],
             {}, [("output_folder", "STRING"), ("summary", "STRING")], size=(340, 300))  # fmt: skip


def caption_node(
    id: int, pos: tuple[int, int], folder: tuple[int, int], name: str = "lora_foundry_demo_prepared"
) -> N:
    return N(id, "LoraFoundry_CaptionDataset", pos,
             [name, DEMO_TAGGER, 0.5, 0.85, "foundrystyle", "overwrite", "", "", "", True,
              True, 0, "", False, 4, "WD14 tagger (tags)", "detailed", "", 160, 0.0, False, True],
             {"folder": (*folder, "STRING")}, CAPTION_OUTPUTS, size=(360, 640), widget_inputs=("folder",))  # fmt: skip


def train_lora_workflow() -> dict:
    train_widgets = [
        "lora_foundry_demo_trained", 6, 0, 1, 1, 4, 4.0, "attention", "", 1e-3, 0.0, "AdamW", "constant_with_warmup",
        1, 0.0, 5.0, 0.0, "MSE", "fp32", True, 0, "fixed", 1.0, False, 3, 2, "fp16", "overwrite", 3, 1.0,
        3, "foundrystyle, a red circle", 0, "model", 0.0, 1.0, 3.0, "none", 1.0, "kohya",
    ]  # fmt: skip
    nodes = [
        note(1, (0, -300), "Caption a folder, build a training data set, train a LoRA, and sample with it.\n\n"
             "The demo trains 6 steps at 64x64 on the random demo checkpoint, so the LoRA learns nothing useful; "
             "the loss curve and the files are real. For real training: your checkpoint, your images (20-50 "
             "good, varied ones) in input/<folder>, a real WD14 tagger, resolution 512 (SD1.5) or 1024 (SDXL), "
             "and 1000-3000 steps. Checkpoints go to models/loras/<output_name>/ and appear in Load LoRA; with "
             "sample_every > 0 a sample image per N steps goes to output/lora_foundry/samples/<output_name>/."),
        N(2, "CheckpointLoaderSimple", (0, 0), [DEMO_CHECKPOINT], {}, [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
        prepare_node(3, (0, 200)),
        caption_node(4, (360, 200), (3, 0)),
        N(5, "LoraFoundry_TrainingDataset", (760, 200),
          ["lora_foundry_demo_prepared", 64, "foundrystyle", True, "center", False, False, 0, 0.0, 2, "memory"],
          {"folder": (4, 3, "STRING"), "vae": (2, 2, "VAE"), "clip": (2, 1, "CLIP")},
          [("dataset", "LORA_TRAINING_DATASET"), ("summary", "STRING")], size=(340, 380), widget_inputs=("folder",)),
        N(6, "LoraFoundry_TrainLora", (1140, 0), train_widgets,
          {"model": (2, 0, "MODEL"), "clip": (2, 1, "CLIP"), "dataset": (5, 0, "LORA_TRAINING_DATASET"),
           "vae": (2, 2, "VAE")},
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("lora_name", "STRING"), ("loss_curve", "IMAGE")], size=(360, 820)),
        N(7, "SaveImage", (1540, 600), ["lora_foundry/loss_curve"], {"images": (6, 3, "IMAGE")}, []),
        *_sampling_tail((6, 0), (6, 1), (2, 2), 10, 1540, "foundrystyle, a red circle", "lora_foundry/trained"),
    ]  # fmt: skip
    return expand(nodes)


def train_lora_flux_workflow() -> dict:
    prepared = "lora_foundry_demo_prepared_flux"
    train_widgets = [
        "lora_foundry_demo_flux_trained", 4, 0, 1, 1, 4, 4.0, "attention", "", 1e-3, 0.0, "AdamW",
        "constant_with_warmup", 1, 0.0, 0.0, 0.0, "MSE", "fp32", True, 0, "fixed", 1.0, False, 2, 2, "bf16",
        "overwrite", 3, 1.0, 2, "foundrystyle, a red circle", 0, "logit_normal", 0.0, 1.0, 3.0, "none", 1.0,
        "kohya",
    ]  # fmt: skip
    p, guide, neg, lat, ks, dec, save = range(10, 17)
    x = 1540
    nodes = [
        note(1, (0, -300), "Train a LoRA for a Flux model, then sample with it.\n\n"
             "The demo Flux has random weights and 2 of Flux dev's 57 blocks, conditioned by the demo "
             "checkpoint's CLIP-L alone (no T5), so the LoRA learns nothing useful; the training, sample images "
             "and files are real. "
             "Flux trains as a flow-matching model: noise levels drawn by timestep_sampling (here logit_normal), "
             "guidance 1.0 while training; image sides must be multiples of 16. For real training: flux1-dev in "
             "'Load Diffusion Model', its ae.safetensors in 'Load VAE', DualCLIPLoader (clip_l + t5xxl, type flux) "
             "for CLIP, sentence captions, resolution 512-1024, rank 16-32, lr 1e-4 and 1000-3000 steps. Sample "
             "with CFG 1 and FluxGuidance 3.5, as here."),
        N(2, "UNETLoader", (0, 0), [DEMO_FLUX, "default"], {}, [("MODEL", "MODEL")], size=(315, 82)),
        N(3, "CLIPLoader", (0, 130), [DEMO_CLIP_L, "stable_diffusion", "default"], {}, [("CLIP", "CLIP")],
          size=(315, 106)),
        N(4, "VAELoader", (0, 290), [DEMO_FLUX_VAE], {}, [("VAE", "VAE")], size=(315, 58)),
        prepare_node(5, (0, 400), prepared),
        caption_node(6, (360, 400), (5, 0), prepared),
        N(7, "LoraFoundry_TrainingDataset", (760, 200),
          [prepared, 64, "foundrystyle", True, "center", False, False, 0, 0.0, 2, "memory"],
          {"folder": (6, 3, "STRING"), "vae": (4, 0, "VAE"), "clip": (3, 0, "CLIP")},
          [("dataset", "LORA_TRAINING_DATASET"), ("summary", "STRING")], size=(340, 380), widget_inputs=("folder",)),
        N(8, "LoraFoundry_TrainLora", (1140, 0), train_widgets,
          {"model": (2, 0, "MODEL"), "clip": (3, 0, "CLIP"), "dataset": (7, 0, "LORA_TRAINING_DATASET"),
           "vae": (4, 0, "VAE")},
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("lora_name", "STRING"), ("loss_curve", "IMAGE")], size=(360, 820)),
        N(9, "SaveImage", (x, 600), ["lora_foundry/flux_loss_curve"], {"images": (8, 3, "IMAGE")}, []),
        N(p, "CLIPTextEncode", (x, 0), ["foundrystyle, a red circle"], {"clip": (8, 1, "CLIP")},
          [("CONDITIONING", "CONDITIONING")]),
        N(guide, "FluxGuidance", (x, 200), [3.5], {"conditioning": (p, 0, "CONDITIONING")},
          [("CONDITIONING", "CONDITIONING")], size=(315, 58)),
        N(neg, "CLIPTextEncode", (x, 300), [""], {"clip": (8, 1, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
        N(lat, "EmptySD3LatentImage", (x, 480), [64, 64, 1], {}, [("LATENT", "LATENT")], size=(315, 106)),
        N(ks, "KSampler", (x + 350, 0), [42, "fixed", 2, 1.0, "euler", "simple", 1.0],
          {"model": (8, 0, "MODEL"), "positive": (guide, 0, "CONDITIONING"), "negative": (neg, 0, "CONDITIONING"),
           "latent_image": (lat, 0, "LATENT")}, [("LATENT", "LATENT")], size=(315, 262)),
        N(dec, "VAEDecode", (x + 700, 0), [], {"samples": (ks, 0, "LATENT"), "vae": (4, 0, "VAE")},
          [("IMAGE", "IMAGE")], size=(260, 80)),
        N(save, "SaveImage", (x + 1000, 0), ["lora_foundry/trained_flux"], {"images": (dec, 0, "IMAGE")}, []),
    ]  # fmt: skip
    return expand(nodes)


def stack_merge_workflow() -> dict:
    slot = lambda name, s: [name, True, s, s, ""]  # noqa: E731 - lora_i, on_i, strength_model_i, strength_clip_i, block_weights_i
    stack_widgets = [
        *slot(DEMO_LORA, 0.8),
        *slot(DEMO_LORA_B, 0.5),
        *slot("None", 1.0),
        *slot("None", 1.0),
        "",
    ]
    nodes = [
        note(1, (0, -300), "Apply several LoRAs at once, and merge them into one new LoRA file.\n\n"
             "LoRA Stack collects entries (switch one off with its toggle; chain stacks for more, or use rows). "
             "Apply LoRA Stack patches every weight once for the whole stack. Merge LoRAs writes the same stack "
             "as models/loras/<output_name>.safetensors: 'svd' at a rank at least the sum of the ranks (here "
             "8 + 4) is exact; lower ranks report their error. Use LoRAs made for your checkpoint's base model."),
        N(2, "CheckpointLoaderSimple", (0, 0), [DEMO_CHECKPOINT], {}, [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
        N(3, "LoraFoundry_LoraStack", (350, 0), stack_widgets, {}, [("lora_stack", "LORA_STACK")], size=(340, 520)),
        N(4, "LoraFoundry_ApplyLoraStack", (720, 0), ["patch weights"],
          {"model": (2, 0, "MODEL"), "lora_stack": (3, 0, "LORA_STACK"), "clip": (2, 1, "CLIP")},
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("trigger_words", "STRING"), ("report", "STRING")], size=(320, 160)),
        N(5, "LoraFoundry_MergeLoras", (720, 400), ["svd", 12, 0, 0.5, 0, "fixed", "fp16", "lora_foundry_demo_merged", True],
          {"model": (2, 0, "MODEL"), "lora_stack": (3, 0, "LORA_STACK"), "clip": (2, 1, "CLIP")},
          [("lora_name", "STRING"), ("report", "STRING")], size=(340, 330)),
        N(6, "PreviewAny", (1100, 560), [], {"source": (5, 1, "STRING")}, [], size=(400, 200)),
        *_sampling_tail((4, 0), (4, 1), (2, 2), 10, 1100, "foundrystyle, foundryglow, a harbour", "lora_foundry/stack"),
    ]  # fmt: skip
    return expand(nodes)


def resize_lora_workflow() -> dict:
    nodes = [
        note(1, (0, -260), "Lower a LoRA's rank into a new, smaller file in models/loras.\n\n"
             "mode 'fixed' keeps 'rank'; 'sv_ratio' keeps singular values above value x the largest; 'energy' "
             "keeps that fraction of each layer's Frobenius energy. The report lists the energy kept; the "
             "original file is never changed. Pick your own kohya-format LoRA in lora_name."),
        N(2, "LoraFoundry_ResizeLora", (0, 0), [DEMO_LORA, "fixed", 4, 0.9, "fp16", "lora_foundry_demo_resized", True],
          {}, [("lora_name", "STRING"), ("report", "STRING")], size=(340, 260)),
        N(3, "PreviewAny", (380, 0), [], {"source": (2, 1, "STRING")}, [], size=(400, 240)),
    ]  # fmt: skip
    return expand(nodes)


def caption_dataset_workflow() -> dict:
    nodes = [
        note(1, (0, -260), "Prepare a folder of training images, then caption it with a WD14 tagger.\n\n"
             "Prepare Images copies the images of input/lora_foundry_demo_dataset into aspect-ratio buckets in a new "
             "folder (the originals are never changed); Caption Dataset writes a .txt caption beside each prepared "
             "image, trigger word first. The demo tagger only looks at colours; for real captions put a WD14 tagger "
             "(model.onnx + selected_tags.csv, e.g. from SmilingWolf's wd-v1-4 taggers) in models/taggers/<name>/ and "
             "pick it, and point 'source_folder' at your own images. For sentence captions (Flux, Qwen-Image, Wan and "
             "other DiT models), put a vision-language model folder (Qwen2.5-VL, Qwen3-VL, Florence-2 or JoyCaption, "
             "with safetensors weights) in models/captioners/<name>/ and pick it as 'captioner'."),
        prepare_node(2, (0, 0)),
        caption_node(3, (400, 0), (2, 0)),
        N(4, "SaveImage", (800, 0), ["lora_foundry/caption_previews"], {"images": (3, 2, "IMAGE")}, []),
    ]  # fmt: skip
    return expand(nodes)


WORKFLOWS = {
    "load_lora.json": load_lora_workflow,
    "caption_dataset.json": caption_dataset_workflow,
    "train_lora.json": train_lora_workflow,
    "train_lora_flux.json": train_lora_flux_workflow,
    "stack_merge.json": stack_merge_workflow,
    "resize_lora.json": resize_lora_workflow,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--check", action="store_true", help="fail if a committed workflow differs from the builder"
    )
    args = ap.parse_args()
    stale = []
    for name, make in WORKFLOWS.items():
        text = json.dumps(make(), indent=2) + "\n"
        path = REPO / "workflows" / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale workflows (run scripts/build_workflows.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
