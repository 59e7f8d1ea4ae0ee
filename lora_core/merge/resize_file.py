"""Resizing a whole LoRA file: lower every module's rank and write a new kohya file with the
source's metadata carried over and the per-module energy kept reported. The source is opened
through the loader (apply/loader.py), so it is read as Load LoRA reads it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..adapters import LoraAdapter
from ..apply.opening import LoadedLora, load_lora
from ..apply.te_names import kohya_te4_name
from ..budget import check_fits, factors_need
from ..files.savefile import resolve_dtype, safe_output_name, save_lora
from .resize import ResizeReport, resize_modules


@dataclass(frozen=True)
class ResizeFileResult:
    path: str
    reports: dict[str, ResizeReport]

    def text(self) -> str:
        r = list(self.reports.values())
        before = sorted({x.old_rank for x in r})
        after = sorted({x.new_rank for x in r})
        energy = [x.energy_kept for x in r]
        lines = [
            f"wrote {os.path.basename(self.path)}: {len(r)} modules",
            f"rank {_span(before)} -> {_span(after)}",
            f"energy kept: mean {sum(energy) / len(energy):.4f}, lowest {min(energy):.4f}",
        ]
        worst = sorted(self.reports.items(), key=lambda kv: kv[1].energy_kept)[:5]
        lines += [
            f"  {name}: rank {rep.old_rank} -> {rep.new_rank}, energy {rep.energy_kept:.4f}"
            for name, rep in worst
        ]
        return "\n".join(lines)


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _kohya_modules(lora: LoadedLora) -> dict[str, LoraAdapter]:
    parsed, name = lora.parsed, lora.name
    modules = {}
    for module, adapter in parsed.modules.items():
        if not isinstance(adapter, LoraAdapter) or adapter.dora_scale is not None or adapter.mid is not None:
            raise ValueError(
                f"{name}: module {module} is {type(adapter).__name__}"
                f"{' with DoRA' if getattr(adapter, 'dora_scale', None) is not None else ''}"
                f"{' (Tucker)' if getattr(adapter, 'mid', None) is not None else ''}; Resize LoRA handles plain "
                "LoRA/LoCon modules only"
            )
        if not module.startswith("lora_"):
            raise ValueError(
                f"{name} is not in kohya layout (module {module}); merge it once with Merge LoRAs (method concat) "
                "to get a kohya file, then resize that"
            )
        alpha = adapter.alpha if adapter.alpha is not None else float(adapter.rank)
        kohya = kohya_te4_name(module)  # transformers 5 text-encoder names are written as kohya's
        if kohya in modules:
            raise ValueError(
                f"{name} holds module {kohya} twice, in its transformers 4 and 5 spellings; the file is damaged"
            )
        modules[kohya] = LoraAdapter(adapter.up, adapter.down, float(alpha))
    if not modules:
        raise ValueError(f"{name} holds no LoRA modules to resize")
    return modules


def _check_memory(
    modules: dict[str, LoraAdapter], mode: str, value: float, dtype: str, available: int | None
):
    # Only a fixed rank is known before the SVDs; the other modes never exceed the source's rank,
    # and the source is already in memory.
    if mode != "fixed":
        return
    shapes = [(m.up.shape[0], math.prod(m.down.shape[1:]), min(int(value), m.rank)) for m in modules.values()]
    need = factors_need(shapes, dtype, 0, f"resizing {len(shapes)} modules to `rank` {int(value)}",
                        "lower `rank`")  # fmt: skip
    check_fits(need, available, "this machine")


def resize_file(src: str, out_dir: str, output_name: str, mode: str, value: float, dtype: str = "fp16",
                overwrite: bool = False, available: int | None = None) -> ResizeFileResult:  # fmt: skip
    """Resizes ``src`` into ``out_dir/output_name``; ``available``: bytes free, for the memory check."""
    path = os.path.join(out_dir, safe_output_name(output_name))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output_name or switch overwrite on")
    if os.path.realpath(path) == os.path.realpath(src):
        raise ValueError("output_name is the source file itself; choose a new name (the original is kept)")
    # The one loading path (read once, cached): layout renames and header / PEFT-config alphas
    # included, as Load LoRA applies the file.
    lora = load_lora(src)
    modules = _kohya_modules(lora)
    _check_memory(modules, mode, value, dtype, available)
    result = resize_modules(modules, mode, value)
    meta = dict(lora.metadata)
    ranks = {m.rank for m in result.modules.values()}
    meta["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = meta["ss_network_dim"]
    meta["ss_output_name"] = output_name
    meta["lora_foundry.resize"] = json.dumps({"source": os.path.basename(src), "mode": mode, "value": value})
    save_lora(path, result.modules, meta, resolve_dtype(dtype), overwrite=overwrite)
    return ResizeFileResult(path=path, reports=dict(result.reports))
