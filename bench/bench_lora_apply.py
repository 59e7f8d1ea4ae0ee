"""Benchmark: loading and applying LoRAs on the full-size demo SD1.5, against ComfyUI core's LoraLoader.

Both sides run in this process on the same model and the same files, and the script prints
ratios (core time / ours). Phases:
  load   : read + parse the file(s) and build the patches (what the loader node does; ours
           also concatenates each weight's LoRA factors once here, for every later model load)
  patch  : ModelPatcher.patch_model for MODEL and CLIP, i.e. computing every patched weight
  strength change : the loader run again with another strength (file reads counted)
Stack: 5 rank-32 LoRAs on every attention, feed-forward and proj_in/proj_out layer of the UNet and
every attention / MLP layer of the text encoder (264 modules): 5 chained core loaders against one
Apply LoRA Stack (one fused patch per weight). The patched weights of both are compared. The
"floor" row times only one in-place GEMM per weight over factors concatenated in advance,
outside ModelPatcher; the "fp32 copies" row times only the fresh float32 copy of each weight that
ModelPatcher makes before any patch runs (both sides pay it; it is mostly page faults of new memory).
Patch, floor and copies run interleaved, round by round, so load from the VM's neighbours hits
them alike; the per-round core/ours ratios are printed with their range, and next to them the
bound core / (copies + floor): the ratio a patch would reach if it did nothing but ModelPatcher's
copy and one GEMM per weight. Last, each side's
5-LoRA stack is built and patched once in fresh processes, alternating (--fresh rounds): the
first patch after changing a stack is what a user waits for.

    .venv/bin/python bench/bench_lora_apply.py [--repeat 9] [--fresh 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
sys.path[:0] = [str(COMFY), str(REPO / "scripts")]
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import nodes as comfy_nodes  # noqa: E402

_pkg = types.ModuleType("lora_foundry")
_pkg.__path__ = [str(REPO)]
sys.modules["lora_foundry"] = _pkg
from lora_foundry.lora_core.adapters import scaled_factors  # noqa: E402
from lora_foundry.lora_core.apply import loader  # noqa: E402
from lora_foundry.nodes.load_lora import LoadLora  # noqa: E402
from lora_foundry.nodes.stack import ApplyLoraStack  # noqa: E402

CKPT = COMFY / "models" / "checkpoints" / "lora_foundry_demo_sd15.safetensors"
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7)  # each LoRA of the stack its own strength, as users set them
UNET_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight", ".ff.net.0.proj.weight",
                 ".ff.net.2.weight", ".proj_in.weight", ".proj_out.weight")  # fmt: skip
CLIP_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "out_proj.weight",
    "fc1.weight",
    "fc2.weight",
)


def make_lora(model, clip, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    unet_sd = model.model.diffusion_model.state_dict()
    out = {}

    def add(name, shape):
        d_in = int(torch.Size(shape[1:]).numel())
        extra = (1, 1) if len(shape) == 4 else ()
        out[f"{name}.lora_down.weight"] = (
            (torch.randn(rank, d_in, generator=g) * d_in**-0.5).reshape(rank, shape[1], *extra).half()
        )
        out[f"{name}.lora_up.weight"] = (
            (torch.randn(shape[0], rank, generator=g) * 0.1).reshape(shape[0], rank, *extra).half()
        )
        out[f"{name}.alpha"] = torch.tensor(float(rank))

    for diff_key, ldm_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if ".attentions." in diff_key and diff_key.endswith(UNET_SUFFIXES):
            add("lora_unet_" + diff_key[: -len(".weight")].replace(".", "_"), unet_sd[ldm_key].shape)
    for key, t in clip.cond_stage_model.state_dict().items():
        if ".encoder.layers." in key and key.endswith(CLIP_SUFFIXES):
            add("lora_te_" + key[len("clip_l.transformer.") : -len(".weight")].replace(".", "_"), t.shape)
    return out


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def patch_once(model, clip) -> float:
    """Seconds to compute every patched weight of MODEL and CLIP (then restored, untimed)."""
    t = time.perf_counter()
    model.patch_model()
    clip.patcher.patch_model()
    seconds = time.perf_counter() - t
    model.unpatch_model()
    clip.patcher.unpatch_model()
    return seconds


def patched_weights(model, clip) -> dict[str, torch.Tensor]:
    model.patch_model()
    clip.patcher.patch_model()
    weights = {"m." + k: comfy.utils.get_attr(model.model, k).detach().clone() for k in model.patches}
    weights |= {
        "c." + k: comfy.utils.get_attr(clip.patcher.model, k).detach().clone() for k in clip.patcher.patches
    }
    model.unpatch_model()
    clip.patcher.unpatch_model()
    return weights


def fresh_copies(patchers):
    """ModelPatcher's share: a new float32 copy of every patched weight (allocated, filled, freed)."""
    weights = [comfy.utils.get_attr(p.model, k) for p in patchers for k in p.patches]

    def run() -> float:
        t = time.perf_counter()
        copies = [w.to(torch.float32, copy=True) for w in weights]  # all alive at once, as when patched
        seconds = time.perf_counter() - t
        del copies
        return seconds

    return run


def interleaved(runs: dict[str, object], repeat: int) -> dict[str, list[float]]:
    """Each function once per round, the order reversed every other round, after one untimed warm-up
    round: load from the VM's neighbours then hits every side alike, and per-round ratios are fair."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeat):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            times[name].append(runs[name]())
    return times


def gemm_floor(patchers):
    """The floor: one in-place GEMM per weight over factors concatenated in advance, no ModelPatcher."""
    work = []
    for patcher in patchers:
        sd = patcher.model.state_dict()
        for key, patches in patcher.patches.items():
            terms = patches[0][1].terms
            ups = [scaled_factors(t.adapter)[0] * t.strength for t in terms]
            downs = [scaled_factors(t.adapter)[1] for t in terms]
            w = sd[key].float().clone()
            work.append((w.view(w.shape[0], -1), torch.cat(ups, 1), torch.cat(downs, 0)))

    def run() -> float:
        t = time.perf_counter()
        for w, up, down in work:
            w.addmm_(up, down)
        return time.perf_counter() - t

    run.flops = sum(2 * w.shape[0] * w.shape[1] * up.shape[1] for w, up, _ in work)
    return run


def peak_gemm_gflops(rounds: int = 5) -> float:
    """This CPU's float32 GEMM throughput on a large product (best of a few): what no patch can beat."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    torch.mm(a, b, out=c)
    best = min(timed(lambda: torch.mm(a, b, out=c), 1)[0] for _ in range(rounds))
    return 2 * 2048**3 / best / 1e9


def max_rel_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), "different sets of patched weights"
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max()).item() for k in a)


def chain_core(model, clip, entries):
    """5 chained core LoraLoader nodes (a fresh node per entry, as in a graph)."""
    for name, s in entries:
        model, clip = comfy_nodes.LoraLoader().load_lora(model, clip, name, s, s)
    return model, clip


def stack_ours(model, clip, entries):
    return ApplyLoraStack().execute(model, [(n, s, s) for n, s in entries], clip=clip)["result"][:2]


def first_patch_child(side: str, lora_dir: Path) -> None:
    """In a fresh process: load the checkpoint, build one side's 5-LoRA stack, time its first patch."""
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(CKPT), output_vae=False, output_clip=True)
    folder_paths.folder_names_and_paths["loras"] = ([str(lora_dir)], folder_paths.supported_pt_extensions)
    entries = [(p.name, STRENGTHS[i]) for i, p in enumerate(sorted(lora_dir.glob("bench_*.safetensors")))]
    m, c = (chain_core if side == "core" else stack_ours)(model, clip, entries)
    print(f"FIRST_PATCH {patch_once(m, c):.6f}")


def fresh_process_rounds(lora_dir: Path, rounds: int) -> dict[str, list[float]]:
    """The first patch after building the stack, each in its own process, sides alternating."""
    times: dict[str, list[float]] = {"core": [], "ours": []}
    for r in range(rounds):
        for side in ("core", "ours") if r % 2 == 0 else ("ours", "core"):
            cmd = [sys.executable, __file__, "--child", side, "--lora-dir", str(lora_dir)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[side].append(float(out.split("FIRST_PATCH ")[1].split()[0]))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=9, help="timed rounds per phase (default 9)")
    ap.add_argument("--fresh", type=int, default=3, help="fresh-process rounds per side (default 3; 0 skips)")
    ap.add_argument("--child", choices=("core", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--lora-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        first_patch_child(args.child, args.lora_dir)
        return 0
    print(f"checkpoint: {CKPT.name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(CKPT), output_vae=False, output_clip=True)
    tmp = Path(tempfile.mkdtemp(prefix="lf_bench_"))
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp)], folder_paths.supported_pt_extensions)
    names = []
    for i in range(5):
        sd = make_lora(model, clip, 32, seed=i)
        names.append(f"bench_{i}.safetensors")
        save_file(sd, str(tmp / names[-1]))
    n_modules = sum(1 for k in sd if k.endswith(".alpha"))
    print(
        f"5 LoRAs of rank 32 on {n_modules} modules each, {os.path.getsize(tmp / names[0]) / 2**20:.0f} MiB per file\n"
    )

    fresh = None
    if args.fresh > 0:  # first, while this process holds no model: memory pressure slows page faults
        del model, clip, sd
        gc.collect()
        fresh = fresh_process_rounds(tmp, args.fresh)
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(CKPT), output_vae=False, output_clip=True
        )

    core = comfy_nodes.LoraLoader()
    rows = []
    spread: list[tuple[str, list[float]]] = []

    def core_chain(entries):
        return chain_core(model, clip, entries)

    def ours_stack(entries):
        return stack_ours(model, clip, entries)

    def ours_one(name, s):
        return LoadLora().execute(model, name, s, s, clip=clip)["result"][:2]

    for label, entries in (
        ("1 LoRA", [(names[0], 0.8)]),
        ("5 LoRAs", list(zip(names, STRENGTHS, strict=True))),
    ):
        loader.CACHE._items.clear()
        t_core_load, (cm, cc) = timed(lambda e=entries: core_chain(e), 1)
        loader.CACHE._items.clear()
        run = (lambda e=entries: ours_one(*e[0])) if len(entries) == 1 else (lambda e=entries: ours_stack(e))
        t_ours_load, (om, oc) = timed(run, 1)
        floor = gemm_floor([om, oc.patcher])
        times = interleaved(
            {
                "core": lambda m=cm, c=cc: patch_once(m, c),
                "ours": lambda m=om, c=oc: patch_once(m, c),
                "floor": floor,
                "copy": fresh_copies([om, oc.patcher]),
            },
            args.repeat,
        )
        t_core_patch, t_ours_patch, t_floor = (statistics.median(times[k]) for k in ("core", "ours", "floor"))
        ratios = sorted(c / o for c, o in zip(times["core"], times["ours"], strict=True))
        ideal = zip(times["core"], times["floor"], times["copy"], strict=True)
        spread.append(
            (label, ratios, sorted(c / (f + cp) for c, f, cp in ideal), floor.flops / t_floor / 1e9)
        )
        w_core, w_ours = patched_weights(cm, cc), patched_weights(om, oc)
        rows.append((label, "load (first, from disk)", t_core_load, t_ours_load))
        rows.append((label, "patch MODEL+CLIP", t_core_patch, t_ours_patch))
        rows.append((label, "load + patch", t_core_load + t_core_patch, t_ours_load + t_ours_patch))
        rows.append((label, "floor: fused GEMM only", t_core_patch, t_floor))
        rows.append((label, "fp32 copies alone (both pay)", t_core_patch, statistics.median(times["copy"])))
        for part in ("m.", "c."):
            sub_o = {k: v for k, v in w_ours.items() if k.startswith(part)}
            sub_c = {k: v for k, v in w_core.items() if k.startswith(part)}
            name = "MODEL" if part == "m." else "CLIP"
            dtype = next(iter(sub_c.values())).dtype  # fp16 weights: both sides round their fp32 sum
            print(
                f"{label}: {name} weights ({dtype}): max relative difference ours vs core {max_rel_diff(sub_o, sub_c):.2e}"
            )

    reads = loader.CACHE.reads
    t_core_again, _ = timed(lambda: core.load_lora(model, clip, names[0], 0.3, 0.3), args.repeat)
    t_ours_again, _ = timed(lambda: ours_one(names[0], 0.3), args.repeat)
    rows.append(("1 LoRA", "strength change (node re-run)", t_core_again, t_ours_again))
    print(
        f"strength change: file reads by ours: {loader.CACHE.reads - reads}; no checkpoint reload on either side\n"
    )

    print(f"{'case':10} {'phase':32} {'core s':>9} {'ours s':>9} {'core/ours':>10}")
    for label, phase, tc, to in rows:
        print(f"{label:10} {phase:32} {tc:9.3f} {to:9.3f} {tc / to:9.2f}x")
    peak = peak_gemm_gflops()
    for label, ratios, bound, floor_gflops in spread:
        print(
            f"{label}: patch phase core/ours per round (interleaved, {len(ratios)} rounds): "
            f"median {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}x to {ratios[-1]:.2f}x; "
            f"bound for any patch through ModelPatcher, core/(copies + floor): "
            f"median {statistics.median(bound):.2f}x, range {bound[0]:.2f}x to {bound[-1]:.2f}x; "
            f"the floor's GEMMs run at {floor_gflops:.0f} GFLOPS, {100 * floor_gflops / peak:.0f}% of this "
            f"CPU's float32 GEMM peak ({peak:.0f} GFLOPS on a 2048^3 product)"
        )
    if fresh is not None:
        tc, to = statistics.median(fresh["core"]), statistics.median(fresh["ours"])
        ratios = sorted(c / o for c, o in zip(fresh["core"], fresh["ours"], strict=True))
        print(
            f"5 LoRAs: first patch in a fresh process ({args.fresh} rounds per side): core {tc:.3f} s, "
            f"ours {to:.3f} s, {tc / to:.2f}x (per round {ratios[0]:.2f}x to {ratios[-1]:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
