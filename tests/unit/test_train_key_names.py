"""lora_core.train.key_names: a trained LoRA on a fused weight split into diffusers / PEFT modules
(rows of B per module, alpha / rank folded into B, the same A), the pieces planned from a hand-built
row map, and the errors when a map has no diffusers names or does not cover a weight's rows; the
run's file under diffusers names (state.write_lora) holds the same change as the kohya file."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from lora_foundry.lora_core.train.key_names import KEY_NAMES, Piece, diffusers_pieces, split_lora
from lora_foundry.lora_core.train.network import LoraNetwork, Target
from lora_foundry.lora_core.train.run import diffusers_named
from lora_foundry.lora_core.train.state import write_lora

QKV = "diffusion_model.blocks.0.attn.qkv.weight"
PROJ = "diffusion_model.blocks.0.attn.proj.weight"
MOD = "diffusion_model.final.mod.weight"
# as the bridge reads ComfyUI's map: q, k, v as row slices of one fused weight (and their kohya /
# other aliases, which are not diffusers names), a whole weight, a weight whose halves swap
ROW_MAP = {
    "transformer.blocks.0.attn.to_q": (QKV, range(0, 4)),
    "transformer.blocks.0.attn.to_k": (QKV, range(4, 8)),
    "transformer.blocks.0.attn.to_v": (QKV, range(8, 12)),
    "lora_transformer_blocks_0_attn_to_q": (QKV, range(0, 4)),
    "transformer.blocks.0.attn.to_out.0": (PROJ, range(0, 4)),
    "transformer.norm_out.linear": (MOD, [3, 4, 5, 0, 1, 2]),
}
TRAINED = {"lora_unet_qkv": (QKV, 12), "lora_unet_proj": (PROJ, 4), "lora_unet_mod": (MOD, 6)}


def test_key_names_are_kohya_first():
    assert KEY_NAMES == ("kohya", "diffusers")


def test_pieces_from_a_hand_built_map():
    pieces = diffusers_pieces(TRAINED, ROW_MAP, "Toy")
    assert [p.name.rsplit(".", 1)[1] for p in pieces["lora_unet_qkv"]] == ["to_q", "to_k", "to_v"]
    assert pieces["lora_unet_proj"] == (Piece("transformer.blocks.0.attn.to_out.0", range(0, 4)),)
    assert list(pieces["lora_unet_mod"][0].rows) == [3, 4, 5, 0, 1, 2]


def test_split_rows_of_b_times_the_scale_and_the_same_a():
    g = torch.Generator().manual_seed(0)
    down, up, alpha = torch.randn(3, 5, generator=g), torch.randn(12, 3, generator=g), 1.5
    pieces = diffusers_pieces(TRAINED, ROW_MAP, "Toy")["lora_unet_qkv"]
    out = split_lora(down, up, alpha, pieces)
    assert sorted(out) == sorted(f"{p.name}.lora_{s}.weight" for p in pieces for s in "AB")
    change = alpha / 3 * up @ down  # the trained change of the fused weight
    stacked = torch.cat([out[f"{p.name}.lora_B.weight"] @ out[f"{p.name}.lora_A.weight"] for p in pieces])
    torch.testing.assert_close(stacked, change, rtol=1e-6, atol=1e-6)
    for p in pieces:
        assert torch.equal(out[f"{p.name}.lora_A.weight"], down)
        assert torch.equal(out[f"{p.name}.lora_B.weight"], up[p.rows.start : p.rows.stop] * 0.5)


def test_split_reorders_rows_and_splits_convs_on_dim_0():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 4, 1, 1, generator=g), torch.randn(6, 2, 1, 1, generator=g)
    (piece,) = diffusers_pieces(TRAINED, ROW_MAP, "Toy")["lora_unet_mod"]
    b = split_lora(down, up, 2.0, [piece])[f"{piece.name}.lora_B.weight"]
    assert b.shape == (6, 2, 1, 1) and torch.equal(b, up[[3, 4, 5, 0, 1, 2]])  # scale 2 / 2 = 1


def test_no_diffusers_names_is_an_error_naming_family_option_and_fix():
    kohya_only = {k: v for k, v in ROW_MAP.items() if not k.startswith("transformer.")}
    with pytest.raises(ValueError) as error:
        diffusers_pieces(TRAINED, kohya_only, "Toy-Image")
    message = str(error.value)
    assert message.startswith(
        "`key_names` 'diffusers': ComfyUI's key map for Toy-Image has no diffusers name"
    )
    assert "the weights it trains (e.g. lora_unet_" in message and "set `key_names` to 'kohya'" in message
    some = {k: v for k, v in ROW_MAP.items() if k != "transformer.blocks.0.attn.to_out.0"}
    with pytest.raises(
        ValueError, match=r"1 of the 3 weights it trains \(e\.g\. lora_unet_proj\).*choose targets"
    ):
        diffusers_pieces(TRAINED, some, "Toy")


@pytest.mark.parametrize(
    "change",
    [
        {"transformer.blocks.0.attn.to_v": None},  # rows 8-11 missing
        {"transformer.blocks.0.attn.to_v": (QKV, range(7, 11))},  # row 7 twice: to_v left out, 8-11 missing
        {"transformer.blocks.0.attn.to_v": (QKV, range(8, 13))},  # past the weight
    ],
)
def test_rows_not_covered_once_each_are_refused(change):
    row_map = {k: v for k, v in {**ROW_MAP, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=r"Toy's lora_unet_qkv .* do not cover its 12 rows once each"):
        diffusers_pieces(TRAINED, row_map, "Toy")


def test_rows_named_twice_keep_the_names_the_map_lists_first():
    """ComfyUI 0.12's Flux map names a single block's linear1 as to_q / to_k / to_v / proj_mlp and
    again as Flux.2's fused to_qkv_mlp_proj, and linear2 as proj_out and as attn.to_out."""
    fused = {"transformer.blocks.0.attn.to_qkv": (QKV, range(0, 12))}
    proj_alias = {"transformer.blocks.0.attn.proj_alias": (PROJ, range(0, 4))}
    later = diffusers_pieces(TRAINED, {**ROW_MAP, **fused, **proj_alias}, "Toy")
    assert [p.name.rsplit(".", 1)[1] for p in later["lora_unet_qkv"]] == ["to_q", "to_k", "to_v"]
    assert [p.name for p in later["lora_unet_proj"]] == ["transformer.blocks.0.attn.to_out.0"]
    first = diffusers_pieces(TRAINED, {**fused, **proj_alias, **ROW_MAP}, "Toy")
    assert first["lora_unet_qkv"] == (Piece("transformer.blocks.0.attn.to_qkv", range(0, 12)),)
    assert [p.name for p in first["lora_unet_proj"]] == ["transformer.blocks.0.attn.proj_alias"]


def test_flux2_prefers_its_own_names_where_flux1s_come_first():
    linear1 = "diffusion_model.single_blocks.0.linear1.weight"
    row_map = {
        "transformer.single_transformer_blocks.0.attn.to_q": (linear1, range(0, 4)),
        "transformer.single_transformer_blocks.0.attn.to_k": (linear1, range(4, 8)),
        "transformer.single_transformer_blocks.0.attn.to_v": (linear1, range(8, 12)),
        "transformer.single_transformer_blocks.0.proj_mlp": (linear1, range(12, 20)),
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (linear1, range(0, 20)),
    }
    trained = {"lora_unet_single_blocks_0_linear1": (linear1, 20)}
    flux = diffusers_pieces(trained, row_map, "Flux")["lora_unet_single_blocks_0_linear1"]
    assert [p.name.rsplit(".", 1)[1] for p in flux] == ["to_q", "to_k", "to_v", "proj_mlp"]
    (flux2,) = diffusers_pieces(trained, row_map, "Flux.2")["lora_unet_single_blocks_0_linear1"]
    assert flux2 == Piece("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", range(0, 20))


def test_file_under_diffusers_names_holds_the_kohya_change(tmp_path):
    fused = torch.nn.Linear(5, 12, bias=False)
    net = LoraNetwork([Target("lora_unet_qkv", "blocks.0.attn.qkv", fused)], rank=3, alpha=1.5, seed=2)
    with torch.no_grad():
        for branch in net.branches.values():
            branch.up.normal_()
    pieces = {
        "lora_unet_qkv": diffusers_pieces({"lora_unet_qkv": (QKV, 12)}, ROW_MAP, "Toy")["lora_unet_qkv"]
    }
    meta = diffusers_named(
        {"ss_network_alpha": "1.5", "ss_network_args": json.dumps({"targets": "attention"})}, 3
    )
    kohya = safetensors.torch.load_file(
        str(write_lora(tmp_path / "k.safetensors", {"unet": net}, {}, "fp32"))
    )
    path = write_lora(tmp_path / "d.safetensors", {"unet": net}, meta, "fp32", pieces)
    ours = safetensors.torch.load_file(str(path))
    assert set(ours) == {f"transformer.blocks.0.attn.to_{m}.lora_{s}.weight" for m in "qkv" for s in "AB"}
    change = 0.5 * kohya["lora_unet_qkv.lora_up.weight"] @ kohya["lora_unet_qkv.lora_down.weight"]
    stacked = torch.cat([ours[f"transformer.blocks.0.attn.to_{m}.lora_B.weight"]
                         @ ours[f"transformer.blocks.0.attn.to_{m}.lora_A.weight"] for m in "qkv"])  # fmt: skip
    torch.testing.assert_close(stacked, change, rtol=1e-6, atol=1e-6)
    written = safetensors.safe_open(str(path), "pt").metadata()
    assert written["ss_network_alpha"] == "3.0"
    assert json.loads(written["ss_network_args"]) == {"targets": "attention", "key_names": "diffusers",
                                                      "trained_alpha": "1.5"}  # fmt: skip
