"""The Flux mode of bench_train.py (--model flux): a Flux.1-dev-shaped model at the real width,
trained by core's TrainLoraNode (bf16 base) and by ours (bf16 and fp8_e4m3fn bases), each side in
its own process started by bench_train.run_side; see bench_train.py's docstring and
docs/train_bench.md."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench_train import (
    COMFY,
    REPO,
    _best,
    _inference,
    _intervals,
    _pack,
    _reset_peak,
    _run_core,
    _status_gb,
    run_side,
    train_ours,
)

FLUX_FILE = "bench_flux.safetensors"


def flux_config(args) -> dict:
    """Flux.1-dev's layout at the real width (ComfyUI's Flux detection assumes hidden 3072 and 24
    heads of 128), text 768 wide."""
    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 768, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
        "depth": args.double, "depth_single_blocks": args.single, "axes_dim": [16, 56, 56], "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    }  # fmt: skip
    return config


def write_flux(args, path: Path) -> int:
    """Writes the random Flux-shaped diffusion model in bf16 (ComfyUI's own Flux class builds it);
    returns its parameter count."""
    sys.path.insert(0, str(COMFY))
    sys.path.insert(0, str(REPO / "scripts"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.supported_models as sm
    import model_factory
    import torch
    from safetensors.torch import save_file

    config = {**flux_config(args), **model_factory._flux_version_fields()}
    patcher = model_factory._dit_patcher(sm.Flux, config, 0, torch.bfloat16)
    sd = {k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
    count = sum(v.numel() for v in sd.values())
    save_file(sd, str(path))
    return count


def flux_data(args) -> tuple[list, list]:
    """(latents, conds): the same random tensors for both sides, one per image."""
    import torch

    g = torch.Generator().manual_seed(0)
    side = args.res // 8
    latents = [torch.randn(1, 16, side, side, generator=g) for _ in range(args.images)]
    conds = [(torch.randn(1, args.tokens, 768, generator=g), torch.randn(1, 768, generator=g))
             for _ in range(args.images)]  # fmt: skip
    return latents, conds


def _load_flux(args, base: Path):
    """The MODEL as ComfyUI's loaders build it from the file: bf16 storage, or UNETLoader's fp8_e4m3fn."""
    import torch

    import nodes

    with _inference():
        if args.weight_dtype == "bf16":
            import comfy.sd

            model = comfy.sd.load_diffusion_model(
                str(base / FLUX_FILE), model_options={"dtype": torch.bfloat16}
            )
        else:
            model = nodes.UNETLoader().load_unet(FLUX_FILE, args.weight_dtype)[0]
    w = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    expected = torch.bfloat16 if args.weight_dtype == "bf16" else torch.float8_e4m3fn
    if w.dtype != expected or type(model.model).__name__ != "Flux":
        raise RuntimeError(
            f"loaded {type(model.model).__name__} with {w.dtype} weights, expected Flux {expected}"
        )
    return model


def _setup_flux(base: Path, args):
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.folder_names_and_paths["loras"] = (
        [str(base / "loras")],
        folder_paths.supported_pt_extensions,
    )
    folder_paths.folder_names_and_paths["diffusion_models"] = (
        [str(base)],
        folder_paths.supported_pt_extensions,
    )
    (base / "loras").mkdir(exist_ok=True)
    model = _load_flux(args, base)
    _reset_peak()
    return model


def worker_ours(args, base: Path) -> dict:
    model = _setup_flux(base, args)
    _pack()
    from lora_foundry.lora_core.train.dataset import DatasetOptions, DatasetScan, LatentDataset, Sample
    from lora_foundry.nodes import comfy_bridge_train as train_bridge
    from lora_foundry.nodes import train as pack

    if args.keep_casts:  # the ablation row: autograd keeps each cast weight until backward, as before
        pack.recast_frozen_linears = lambda modules: lambda: None
    latents, conds = flux_data(args)
    samples, by_caption = [], {}
    for i, (latent, (context, pooled)) in enumerate(zip(latents, conds, strict=True)):
        caption = f"zkw, item {i}"
        samples.append(Sample(latent[0], None, (args.res, args.res), caption, 1))
        by_caption[caption] = {"context": context, "pooled": pooled}
    scan = DatasetScan(folder=base, entries=(), problems=(), without_caption=0)
    dataset = LatentDataset(samples, DatasetOptions(resolution=args.res, flip=False), scan)
    dataset.conds = by_caption
    times: list[float] = []
    train_bridge.send_event = lambda data: times.append(time.perf_counter())
    released: list[float] = []
    release = pack.release_freed_memory

    def measured_release() -> bool:  # what the node hands back to the system when the run ends
        before = _status_gb("VmRSS")
        ran = release()
        released.append(before - _status_gb("VmRSS"))
        return ran

    pack.release_freed_memory = measured_release

    def run() -> None:
        with _inference():
            train_ours(pack, model, None, dataset, args, save_dtype="bf16", unique_id="1")

    if args.tensors:  # not timed: the profiler slows every allocation down
        return _held_tensors(model, run)
    if args.heap:  # not timed: a sampling thread runs beside the steps
        return _heap_at_peak(run)
    run()
    return {"s_per_step": _intervals(times), "steps_timed": len(times) - 1, "released_gb": sum(released)}


def _held_tensors(model, run) -> dict:
    """The tensors ours holds at its peak, as ``torch.cuda.max_memory_allocated`` counts them on a
    GPU: the base weights (by then copied out of inference mode) and the LoRA's weights when the
    first step starts, plus the most that the run's later allocations, recorded by torch's profiler
    from that step on, add to them. The profiler does not see frees of tensors made before it
    starts (so it starts after the weights are copied, and a free of an older tensor is not
    subtracted: the count errs high). Reads the profiler's event tree, a private API of torch."""
    import torch
    from torch._C._profiler import _EventType

    from lora_foundry.lora_core.train import trainer

    first_step, before = trainer.Trainer.train_step, {}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def train_step(self, *args, **kwargs):
        if not before:
            before["weights"] = _storage_bytes(model.model.diffusion_model.state_dict().values())
            before["lora"] = _storage_bytes(p for net in self.networks.values() for p in net.parameters())
            prof.__enter__()
        return first_step(self, *args, **kwargs)

    trainer.Trainer.train_step = train_step
    try:
        run()
    finally:
        trainer.Trainer.train_step = first_step
        if before:
            prof.__exit__(None, None, None)
    changes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))  # < 0: a free
        stack.extend(event.children)
    held = peak = 0
    for _, size in sorted(changes):
        held += size
        peak = max(peak, held)
    return {"tensor_peak_gb": (before["weights"] + before["lora"] + peak) / 1024**3,
            "weights_gb": before["weights"] / 1024**3}  # fmt: skip


def _heap_at_peak(run) -> dict:
    """Where the resident set is when it is highest during ``run``: glibc's heap by ``mallinfo2``
    (bytes in use, bytes its arenas keep free, bytes in chunks it mmapped) and the process's
    anonymous and file-backed pages (/proc/self/smaps_rollup), read each time the resident set,
    sampled every 2 ms, rises 4 MB past its highest so far; and the same just before the run."""
    import ctypes
    import os
    import threading

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc 2.33+
    mallinfo2.restype = Mallinfo2
    page, gb = os.sysconf("SC_PAGE_SIZE"), 1024**3

    def split() -> dict:
        m, pages = mallinfo2(), {}
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            name, *rest = line.split()
            if rest[-1:] == ["kB"]:
                pages[name.rstrip(":")] = int(rest[0]) * 1024
        return {"rss_gb": pages["Rss"] / gb, "heap_used_gb": m.uordblks / gb, "heap_free_gb": m.fordblks / gb,
                "heap_mmapped_gb": m.hblkhd / gb, "file_gb": (pages["Rss"] - pages["Anonymous"]) / gb,
                "other_anon_gb": (pages["Anonymous"] - m.arena - m.hblkhd) / gb}  # fmt: skip

    state = {"high": 0, "peak": None, "done": threading.Event()}

    def sample() -> None:
        while not state["done"].wait(0.002):
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            if rss > state["high"] + 4 * 1024**2:
                state["high"], state["peak"] = rss, split()

    before = split()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        state["done"].set()
        sampler.join()
    return {"heap_before": before, "heap_peak": state["peak"]}


def _storage_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def worker_core(args, base: Path) -> dict:
    model = _setup_flux(base, args)
    import comfy.utils

    latents, conds = flux_data(args)
    latent_list = [{"samples": latent} for latent in latents]
    positive = [[[context, {"pooled_output": pooled}]] for context, pooled in conds]
    times: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: times.append(time.perf_counter()))
    _run_core(model, latent_list, positive, args)
    return {"s_per_step": _intervals(times), "steps_timed": len(times) - 1}


def compare(args) -> None:
    rows = [
        ("ours, bf16 base", "ours", "bf16", False),
        ("ours, fp8_e4m3fn base", "ours", "fp8_e4m3fn", False),
    ]
    # core's training_dtype bf16 crashes on a bf16 model loaded in inference mode on the CPU (its layers
    # save the loaded weights for backward): with --precision bf16 only ours runs, fp8 against bf16 base
    with_core = args.precision == "fp32"
    if with_core:
        rows.insert(0, ("core TrainLoraNode, bf16 base", "core", "bf16", False))
    if args.ablate:
        rows += [("ours, bf16, cast copies kept", "ours", "bf16", True),
                 ("ours, fp8, cast copies kept", "ours", "fp8_e4m3fn", True)]  # fmt: skip
    runs: dict[str, list[dict]] = {label: [] for label, *_ in rows}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        params = write_flux(args, base / FLUX_FILE)
        for _ in range(args.rounds):  # interleaved, so load from other processes hits every side
            for label, side, weight_dtype, keep_casts in rows:
                runs[label].append(run_side(side, args, base, "attention", weight_dtype, keep_casts))

        def per_base(**probe) -> dict:  # one more untimed run of ours per base
            return {
                dtype: run_side("ours", args, base, "attention", dtype, **probe)
                for dtype in ("bf16", "fp8_e4m3fn")
            }

        held = per_base(tensors=True) if args.tensors else {}
        heap = per_base(heap=True) if args.heap else {}
    best = {label: _best(runs[label]) for label in runs}
    ours, fp8 = best["ours, bf16 base"], best["ours, fp8_e4m3fn base"]
    core = best[rows[0][0]] if with_core else None
    print(f"\nFlux-shaped (hidden 3072, 24 heads, {args.double} double + "
          f"{args.single} single blocks, {params / 1e6:.0f}M parameters), {args.res}x{args.res} "
          f"({args.res // 8}x{args.res // 8}x16 latents), {args.tokens} text tokens, compute {args.precision}, "
          f"rank {args.rank}, batch {args.batch}, checkpointing {args.checkpointing}, {args.steps} timed steps, "
          f"best of {args.rounds} rounds")  # fmt: skip
    print(f"{'':32}{'s/step':>10}{'speed-up':>10}{'peak RSS GB':>13}{'vs core':>9}{'vs ours bf16':>14}")
    for label, *_ in rows:
        r = best[label]
        ref = core or ours
        print(f"{label:32}{r['s_per_step']:10.2f}{ref['s_per_step'] / r['s_per_step']:9.2f}x{r['peak_rss_gb']:13.2f}"
              f"{r['peak_rss_gb'] / core['peak_rss_gb'] if core else float('nan'):9.2f}"
              f"{r['peak_rss_gb'] / ours['peak_rss_gb']:14.2f}")  # fmt: skip
    if core:
        print(f"ratios: ours / core speed {core['s_per_step'] / ours['s_per_step']:.2f}x (goal >= 2), "
              f"peak RSS {1 - ours['peak_rss_gb'] / core['peak_rss_gb']:.1%} lower (goal >= 25%)")  # fmt: skip
    else:
        print(
            "(compute bf16: core not run, its bf16 training crashes on the CPU; speed-up is against ours bf16)"
        )
    print(
        f"fp8 / bf16 base: peak RSS {1 - fp8['peak_rss_gb'] / ours['peak_rss_gb']:.1%} lower (goal >= 35%), "
        f"speed {ours['s_per_step'] / fp8['s_per_step']:.2f}x (goal >= 1)"
    )
    print("peak RSS: highest resident set after the model was loaded (VmHWM reset), model included")
    print(f"given back to the system when the run ended (model still loaded): {ours['released_gb']:.2f} GB "
          f"(bf16 base), {fp8['released_gb']:.2f} GB (fp8 base)")  # fmt: skip
    if held:
        b16, b8 = held["bf16"], held["fp8_e4m3fn"]
        print(f"tensors ours holds at its peak, weights included (torch's profiler; what max_memory_allocated "
              f"counts on a GPU): bf16 base {b16['tensor_peak_gb']:.2f} GB (weights {b16['weights_gb']:.2f}), "
              f"fp8 base {b8['tensor_peak_gb']:.2f} GB (weights {b8['weights_gb']:.2f}), "
              f"{1 - b8['tensor_peak_gb'] / b16['tensor_peak_gb']:.1%} lower")  # fmt: skip
    if heap:
        print(
            "where ours' resident set is at its peak, GB (one more run each; glibc's mallinfo2, smaps_rollup):"
        )
        columns = ("rss_gb", "heap_used_gb", "heap_free_gb", "heap_mmapped_gb", "other_anon_gb", "file_gb")
        print(f"{'':32}" + "".join(f"{c[:-3]:>15}" for c in columns))
        for dtype, r in heap.items():
            for when, label in (("before", "before the run"), ("peak", "at the run's peak")):
                print(f"{f'{dtype}, {label}':32}" + "".join(f"{r['heap_' + when][c]:15.2f}" for c in columns))
        b16, b8 = heap["bf16"]["heap_peak"], heap["fp8_e4m3fn"]["heap_peak"]
        print(f"fp8 / bf16 peak RSS less the heap kept free: "
              f"{1 - (b8['rss_gb'] - b8['heap_free_gb']) / (b16['rss_gb'] - b16['heap_free_gb']):.1%} lower")  # fmt: skip
