"""Key names of a trained LoRA file: kohya's (sd-scripts' ``lora_unet_`` names with ``.alpha``, the
default) or diffusers / PEFT names (``transformer.`` + the diffusers module path, ``.lora_A.weight`` /
``.lora_B.weight``), which diffusers' own loader takes as they are.

One trained weight can be several diffusers modules: ComfyUI fuses q, k and v (Flux, SD3) into one
weight whose rows are diffusers' ``to_q``, ``to_k`` and ``to_v``. The caller (the bridge) hands over a
row map read from ComfyUI's LoRA key map: for each diffusers name, the model weight it patches and
which rows of that weight are the diffusers module's rows, in its order. A LoRA (down A, up B, scale
alpha / rank) trained on a weight becomes one LoRA per diffusers module: the same A, and the rows of
B that module owns times the scale. No alpha is written: diffusers reads none from a file it does
not convert (``network_alphas`` is None for SD3, Flux and the other DiT loaders, so PEFT's
lora_alpha is the rank: W + B A), and ComfyUI's loaders read a missing alpha as scale 1 too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

KeyNames = Literal["kohya", "diffusers"]
KEY_NAMES: tuple[str, ...] = get_args(KeyNames)
PREFIX = "transformer."  # diffusers' prefix of a pipeline's transformer in a LoRA file
LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"

# diffusers name -> (model weight key, rows of that weight in the diffusers module's order)
RowMap = Mapping[str, tuple[str, Sequence[int]]]


@dataclass(frozen=True)
class Piece:
    """One diffusers module of a trained weight: its name and the weight's rows it owns, in order."""

    name: str  # "transformer.transformer_blocks.0.attn.to_q"
    rows: Sequence[int]


def _fix(family: str) -> str:
    return (
        f"{family} LoRAs can be saved only with kohya names: set `key_names` to 'kohya' (the default; "
        "ComfyUI and kohya-based tools read it)"
    )


# Where ComfyUI's key map names the same rows in the forms of two diffusers classes, it lists Flux.1's
# first (a single block's linear1 as to_q / to_k / to_v / proj_mlp, linear2 as proj_out, the MLPs as
# ff.net.*); Flux.2's own class (diffusers' Flux2Transformer2DModel) names them by these endings.
PREFERRED_ENDINGS: Mapping[str, tuple[str, ...]] = {
    "Flux.2": (".attn.to_qkv_mlp_proj", ".attn.to_out", ".linear_in", ".linear_out"),
}


def _first_names(named: Sequence[Piece], family: str) -> list[Piece]:
    """The pieces that name each row first, sorted by row: the family's preferred names
    (PREFERRED_ENDINGS), then the rest in the key map's order; a later name sharing a row with one
    kept is left out (a map that names the same rows twice: PREFERRED_ENDINGS' comment)."""
    endings = PREFERRED_ENDINGS.get(family, ())
    ordered = sorted(named, key=lambda p: not p.name.endswith(endings)) if endings else named
    taken: set[int] = set()
    kept = []
    for piece in ordered:
        rows = set(piece.rows)
        if rows & taken:
            continue
        taken |= rows
        kept.append(piece)
    return sorted(kept, key=lambda p: (min(p.rows, default=-1), p.name))


def diffusers_pieces(
    trained: Mapping[str, tuple[str, int]], row_map: RowMap, family: str
) -> dict[str, tuple[Piece, ...]]:
    """Trained module name -> its diffusers pieces, for ``trained`` (module name -> (weight key, rows
    of that weight)). Only ``transformer.`` names count. A ValueError naming the family, the option
    and the fix when a trained weight has no such name, or when its names do not cover each of its
    rows exactly once (part of the change would be lost or doubled)."""
    by_weight: dict[str, list[Piece]] = {}
    for name, (key, rows) in row_map.items():
        if name.startswith(PREFIX):
            by_weight.setdefault(key, []).append(Piece(name, rows))
    out, missing = {}, []
    for module, (key, n_rows) in trained.items():
        named = by_weight.get(key, ())
        if not named:
            missing.append(module)
            continue
        pieces = _first_names(named, family)
        if sorted(r for p in pieces for r in p.rows) != list(range(n_rows)):
            names = ", ".join(p.name for p in named)
            raise ValueError(
                f"`key_names` 'diffusers': the diffusers names of {family}'s {module} ({names}) do not cover "
                f"its {n_rows} rows once each, so the file would not hold the trained change; {_fix(family)}"
            )
        out[module] = tuple(pieces)
    if missing:
        which = (
            "the weights it trains"
            if len(missing) == len(trained)
            else (f"{len(missing)} of the {len(trained)} weights it trains")
        )
        also = (
            "" if len(missing) == len(trained) else ", or choose targets / blocks that have diffusers names"
        )
        raise ValueError(
            f"`key_names` 'diffusers': ComfyUI's key map for {family} has no diffusers name ({PREFIX}<module>) for "
            f"{which} (e.g. {missing[0]}); {_fix(family)}{also}"
        )
    return out


def _rows(up: Tensor, rows: Sequence[int]) -> Tensor:
    if isinstance(rows, range) and rows.step == 1:
        return up[rows.start : rows.stop]
    return up.index_select(0, torch.as_tensor(list(rows), dtype=torch.long, device=up.device))


def split_lora(down: Tensor, up: Tensor, alpha: float, pieces: Sequence[Piece]) -> dict[str, Tensor]:
    """One trained LoRA as diffusers / PEFT tensors, one A / B pair per piece: A is ``down``, B the
    piece's rows of ``up`` times alpha / rank. Each piece's B A is then exactly its rows of the
    trained change (alpha / rank) up down; a 1x1 / kxk conv LoRA splits the same way (rows on dim 0)."""
    scale = float(alpha) / down.shape[0]
    out = {}
    for piece in pieces:
        out[f"{piece.name}.{LORA_A}"] = down.detach().clone()
        out[f"{piece.name}.{LORA_B}"] = _rows(up.detach(), piece.rows) * scale
    return out
