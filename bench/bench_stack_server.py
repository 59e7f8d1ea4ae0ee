"""Benchmark: what a user waits for after changing a 5-LoRA stack's strengths in a running ComfyUI.

A real ComfyUI server (subprocess, --cpu) runs three graphs on the full-size demo SD1.5:
  core : the checkpoint through 5 chained core LoraLoader nodes
  ours : the checkpoint through LoRA Stack (5 rows) and Apply LoRA Stack
  none : no LoRA at all
each followed by a timer node, two prompts, one sampler step at 64x64, a VAE decode and a
preview. The timer node (written into the benchmark's own custom_nodes folder) loads MODEL and
CLIP as KSampler and CLIPTextEncode do (load_models_gpu, CLIP.load_model), after the previous
graph's patched model was used for sampling, and reports how long that took: the patch phase
inside the real server. The LoRAs are those of bench_lora_apply.py: rank 32 on every attention,
feed-forward and proj_in/proj_out layer of the UNet and every attention / MLP layer of the text
encoder (264 modules each). Every round gives all three graphs a new strength, seed and prompt,
so ComfyUI re-runs the loaders, patches anew and samples; the order of the graphs is rotated every
round. Printed per side: the patch phase, and the whole run (the server's execution_start to
execution_success) with and without the "none" graph's time; medians and per-round core / ours.
Last, runs that change strength_model alone (the text encoder's strength stays), in blocks of
the same graph as a user tweaks it: core patches MODEL and CLIP again; this pack hands out the
same CLIP, which ComfyUI finds loaded with its patches, and patches the MODEL only.

    .venv/bin/python bench/bench_stack_server.py [--rounds 9] [--model-only-rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "scripts")]
from comfy_server import ComfyServer, default_comfy_dir, prepare_base_dir  # noqa: E402

CKPT_NAME = "lora_foundry_demo_sd15.safetensors"
N_LORAS = 5
RANK = 32
SIDES = ("core", "ours", "none")
TIMER = "LoraFoundryBench_PatchTimer"
TIMER_NODE = f'''
import resource
import time
import comfy.model_management


class PatchTimer:
    CATEGORY = "benchmark"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"model": ("MODEL",), "clip": ("CLIP",), "tag": ("INT", {{"default": 0}})}}}}

    def run(self, model, clip, tag):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        comfy.model_management.load_models_gpu([model])
        middle = time.perf_counter()
        clip.load_model()
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        ui = {{"patch_seconds": [seconds], "clip_seconds": [seconds - (middle - start)], "page_faults": [faults]}}
        return {{"ui": ui, "result": (model, clip)}}


NODE_CLASS_MAPPINGS = {{"{TIMER}": PatchTimer}}
'''


def write_loras(folder: Path) -> list[str]:
    """The benchmark's 5 LoRAs, made from the checkpoint's own key map (then the model is freed)."""
    import bench_lora_apply as apply_bench
    import comfy.sd
    from safetensors.torch import save_file

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(apply_bench.CKPT), output_vae=False, output_clip=True
    )
    names = []
    for seed in range(N_LORAS):
        name = f"bench_server_{seed}.safetensors"
        save_file(apply_bench.make_lora(model, clip, RANK, seed), str(folder / name))
        names.append(name)
    del model, clip
    gc.collect()
    return names


def graph(
    side: str, loras: list[str], strength: float, seed: int, clip_strength: float | None = None
) -> dict:
    """The API prompt of one side: LoRAs on MODEL and CLIP, the timer, encode, one step, decode, preview.
    Entry i gets ``strength + 0.05 * i`` (each LoRA its own strength, as users set them)."""
    clip_strength = strength if clip_strength is None else clip_strength
    g: dict[str, dict] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}}
    }
    model, clip = ["ckpt", 0], ["ckpt", 1]
    if side == "core":
        for i, name in enumerate(loras):
            g[f"lora{i}"] = {
                "class_type": "LoraLoader",
                "inputs": {"model": model, "clip": clip, "lora_name": name,
                           "strength_model": strength + 0.05 * i, "strength_clip": clip_strength + 0.05 * i},
            }  # fmt: skip
            model, clip = [f"lora{i}", 0], [f"lora{i}", 1]
    elif side == "ours":
        rows = [
            {
                "lora": n,
                "on": True,
                "strength_model": strength + 0.05 * i,
                "strength_clip": clip_strength + 0.05 * i,
            }
            for i, n in enumerate(loras)
        ]
        g["stack"] = {"class_type": "LoraFoundry_LoraStack", "inputs": {"rows_json": json.dumps(rows)}}
        g["apply"] = {
            "class_type": "LoraFoundry_ApplyLoraStack",
            "inputs": {"model": model, "clip": clip, "lora_stack": ["stack", 0]},
        }
        model, clip = ["apply", 0], ["apply", 1]
    g["timer"] = {"class_type": TIMER, "inputs": {"model": model, "clip": clip, "tag": seed}}
    model, clip = ["timer", 0], ["timer", 1]
    g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": f"a photo, take {seed}"}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": f"blurry {seed}"}}
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["sample"] = {
        "class_type": "KSampler",
        "inputs": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
                   "seed": seed, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                   "denoise": 1.0},
    }  # fmt: skip
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    return g


def run_once(server: ComfyServer, prompt: dict) -> tuple[float, float, int, float]:
    """(patch phase s, whole run s, page faults of the patch phase, the CLIP's part of the patch s):
    the timer node's figures and the server's own run time."""
    entry = server.run(prompt, timeout=900)
    stamps = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
    whole = (stamps["execution_success"] - stamps["execution_start"]) / 1000.0
    timer = entry["outputs"]["timer"]
    return timer["patch_seconds"][0], whole, timer["page_faults"][0], timer["clip_seconds"][0]


def ratio_line(label: str, core: list[float], ours: list[float]) -> str:
    rounds = sorted(c / o for c, o in zip(core, ours, strict=True) if o > 0)
    return (
        f"{label:<30}{statistics.median(core):>9.3f}{statistics.median(ours):>9.3f}"
        f"{statistics.median(core) / statistics.median(ours):>10.2f}x   "
        f"per round {rounds[0]:.2f}x to {rounds[-1]:.2f}x (median {statistics.median(rounds):.2f}x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--model-only-rounds", type=int, default=3,
                        help="then runs per block of one graph (4 blocks) that change strength_model alone (default 3)")  # fmt: skip
    args = parser.parse_args()
    comfy_dir = default_comfy_dir()
    ckpt = comfy_dir / "models" / "checkpoints" / CKPT_NAME
    if not ckpt.exists():
        print(f"the demo checkpoint is missing at {ckpt}: run scripts/setup_runtime.sh", file=sys.stderr)
        return 1
    patch: dict[str, list[float]] = {side: [] for side in SIDES}
    whole: dict[str, list[float]] = {side: [] for side in SIDES}
    faults: dict[str, list[int]] = {side: [] for side in SIDES}
    model_only: dict[str, list[float]] = {"core": [], "ours": []}
    model_only_clip: dict[str, list[float]] = {"core": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="lf_bench_server_") as tmp:
        base = prepare_base_dir(Path(tmp))
        (base / "custom_nodes" / "lora_foundry_bench_timer.py").write_text(TIMER_NODE)
        (base / "models" / "checkpoints" / CKPT_NAME).symlink_to(ckpt)
        loras = write_loras(base / "models" / "loras")
        server = ComfyServer(comfy_dir=comfy_dir, base_dir=base, python=sys.executable).start()
        try:
            print(f"ComfyUI server on {server.url}; {N_LORAS} LoRAs of rank {RANK}, 264 modules each")
            for side in SIDES:  # warm-up: checkpoint load, first file reads, first patch
                run_once(server, graph(side, loras, 0.4, 0))
            for r in range(args.rounds):
                for side in SIDES[r % 3 :] + SIDES[: r % 3]:
                    p, w, f, _ = run_once(server, graph(side, loras, 0.5 + 0.01 * r, r + 1))
                    patch[side].append(p)
                    whole[side].append(w)
                    faults[side].append(f)
                cells = "  ".join(f"{s} {patch[s][-1]:.2f} / {whole[s][-1]:.2f} s" for s in SIDES)
                print(f"round {r + 1} (patch / whole run): {cells}")
            # strength_model alone changes, run after run of the same graph, as a user tweaks it: in
            # blocks per side (core, ours, ours, core), each after an untimed run that loads its models
            # (the sides share the base models, so running the other graph unloads them).
            if args.model_only_rounds:
                for block, side in enumerate(("core", "ours", "ours", "core")):
                    run_once(server, graph(side, loras, 0.69, 200 + block, clip_strength=0.5))
                    for r in range(args.model_only_rounds):
                        prompt = graph(side, loras, 0.7 + 0.01 * r, 300 + 10 * block + r, clip_strength=0.5)
                        p, _, _, c = run_once(server, prompt)
                        model_only[side].append(p)
                        model_only_clip[side].append(c)
        finally:
            server.stop()
    added = {s: [w - n for w, n in zip(whole[s], whole["none"], strict=True)] for s in ("core", "ours")}
    print()
    print(f"{'':<30}{'core s':>9}{'ours s':>9}{'core/ours':>11}")
    print(ratio_line("patch phase (MODEL + CLIP)", patch["core"], patch["ours"]))
    print(ratio_line("whole run minus 'none' run", added["core"], added["ours"]))
    print(ratio_line("whole run", whole["core"], whole["ours"]))
    if model_only["core"]:
        print(ratio_line("patch, strength_model changed", model_only["core"], model_only["ours"]))
        clip_part = {s: statistics.median(v) for s, v in model_only_clip.items()}
        print(
            f"  of which the CLIP's load (median): core {clip_part['core']:.3f} s, ours {clip_part['ours']:.3f} s"
        )
    none_patch, none_whole = statistics.median(patch["none"]), statistics.median(whole["none"])
    print(f"'none' graph: patch {none_patch:.3f} s, whole run {none_whole:.3f} s")
    print(
        "page faults in the patch phase, median: "
        + ", ".join(f"{s} {statistics.median(faults[s]):.0f}" for s in SIDES)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
