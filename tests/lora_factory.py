"""Makes LoRA tensor dicts in the layouts found in the wild, for a tiny in-process model.

Modules are picked from the model's real weights (via ComfyUI's diffusers<->ldm map), so the
same random factors can be written with kohya, diffusers, PEFT or ComfyUI-trainer names and
the results compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTN_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
CLIP_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")  # fmt: skip


@dataclass(frozen=True)
class Module:
    """One adaptable weight: its diffusers-style path, the model key and shape."""

    part: str  # "unet", "te1" (clip_l) or "te2" (clip_g)
    path: str  # diffusers path without ".weight"
    model_key: str
    shape: tuple[int, ...]


def unet_modules(models, attn_only: bool = True, convs: bool = False) -> list[Module]:
    import comfy.utils

    config = models.model.model.model_config.unet_config
    sd = models.model.model.diffusion_model.state_dict()
    out = []
    for diff_key, ldm_key in sorted(comfy.utils.unet_to_diffusers(config).items()):
        if not diff_key.endswith(".weight") or ldm_key not in sd:
            continue
        shape = tuple(sd[ldm_key].shape)
        is_attn = ".attentions." in diff_key and diff_key.endswith(ATTN_SUFFIXES)
        is_ff = ".attentions." in diff_key and (
            ".ff.net." in diff_key or diff_key.endswith(("proj_in.weight", "proj_out.weight"))
        )
        is_conv = convs and len(shape) == 4 and ".resnets." in diff_key
        if is_attn or (not attn_only and len(shape) >= 2 and is_ff) or is_conv:
            out.append(Module("unet", diff_key[: -len(".weight")], "diffusion_model." + ldm_key, shape))
    return out


def clip_modules(models) -> list[Module]:
    sd = models.clip.cond_stage_model.state_dict()
    out = []
    for key, t in sorted(sd.items()):
        for enc, part in (("clip_l.", "te1"), ("clip_g.", "te2")):
            prefix = enc + "transformer.text_model.encoder.layers."
            if key.startswith(prefix) and key.endswith(CLIP_SUFFIXES):
                out.append(
                    Module(part, key[len(enc + "transformer.") : -len(".weight")], key, tuple(t.shape))
                )
    return out


def kohya_name(m: Module, sdxl: bool) -> str:
    if m.part == "unet":
        return "lora_unet_" + m.path.replace(".", "_")
    prefix = "lora_te_" if not sdxl else ("lora_te1_" if m.part == "te1" else "lora_te2_")
    return prefix + m.path.replace(".", "_")


def diffusers_name(m: Module) -> str:
    if m.part == "unet":
        return "unet." + m.path
    return ("text_encoder." if m.part == "te1" else "text_encoder_2.") + m.path


def random_factors(modules: list[Module], rank: int = 4, seed: int = 0, conv3x3_down: bool = True):
    """{module path: (up, down, alpha)} with non-zero up, sized to each weight."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_out = m.shape[0]
        if len(m.shape) == 4:
            kh, kw = m.shape[2:] if conv3x3_down else (1, 1)
            down = torch.randn(rank, m.shape[1], kh, kw, generator=g) * 0.3
            up = torch.randn(d_out, rank, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(rank, m.shape[1], generator=g) * 0.3
            up = torch.randn(d_out, rank, generator=g) * 0.3
        out[m] = (up, down, float(rank) / 2)
    return out


def kohya_lora(factors: dict, sdxl: bool = False) -> dict[str, torch.Tensor]:
    sd = {}
    for m, (up, down, alpha) in factors.items():
        n = kohya_name(m, sdxl)
        sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"], sd[f"{n}.alpha"] = (
            up,
            down,
            torch.tensor(alpha),
        )
    return sd


def diffusers_lora(factors: dict, style: str = "AB") -> dict[str, torch.Tensor]:
    """Diffusers names; style 'AB' (lora_A/lora_B), 'dotted' (.lora.up/.down) or 'peft'."""
    sd = {}
    for m, (up, down, alpha) in factors.items():
        if style == "peft":
            if m.part != "unet":
                continue
            n = "base_model.model." + m.path
        else:
            n = diffusers_name(m)
        if style in ("AB", "peft"):
            sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"] = up, down
        else:
            sd[f"{n}.lora.up.weight"], sd[f"{n}.lora.down.weight"] = up, down
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def _linear(modules: list[Module], sdxl: bool):
    """(kohya name, (out, in)) of each 2-D weight: the layers the LyCORIS test files cover."""
    return [(kohya_name(m, sdxl), tuple(m.shape)) for m in modules if len(m.shape) == 2]


def loha_lora(
    modules: list[Module], sdxl: bool = False, rank: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, shape in _linear(modules, sdxl):
        for w in ("w1", "w2"):
            sd[f"{n}.hada_{w}_a"] = torch.randn(shape[0], rank, generator=g) * 0.3
            sd[f"{n}.hada_{w}_b"] = torch.randn(rank, shape[1], generator=g) * 0.3
        sd[f"{n}.alpha"] = torch.tensor(float(rank))
    return sd


def glora_lora(
    modules: list[Module], sdxl: bool = False, rank: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """LyCORIS GLoRA (current layout): a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in) per 2-D weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (d_out, d_in) in _linear(modules, sdxl):
        for part, shape in (
            ("a1", (d_in, rank)),
            ("a2", (rank, d_in)),
            ("b1", (d_out, rank)),
            ("b2", (rank, d_in)),
        ):
            sd[f"{n}.{part}.weight"] = torch.randn(*shape, generator=g) * 0.2
        sd[f"{n}.alpha"] = torch.tensor(float(rank) / 2)
    return sd


def oft_lora(
    modules: list[Module], sdxl: bool = False, block_size: int = 4, seed: int = 0, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """LyCORIS diag-OFT: ``oft_blocks`` (rows / block_size, block_size, block_size) per 2-D weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (d_out, _) in _linear(modules, sdxl):
        if d_out % block_size:
            continue
        sd[f"{n}.oft_blocks"] = torch.randn(d_out // block_size, block_size, block_size, generator=g) * 0.2
        sd[f"{n}.rescale"] = torch.ones(d_out, 1)  # written by LyCORIS, ignored by ComfyUI
        if alpha is not None:
            sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def boft_lora(
    modules: list[Module], sdxl: bool = False, block_size: int = 4, seed: int = 0, alpha: float | None = 1.0
) -> dict[str, torch.Tensor]:
    """LyCORIS butterfly OFT: ``oft_blocks`` (levels, rows / block_size, block_size, block_size) and a
    per-row ``rescale``; as many levels (up to 3) as the row count allows."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (d_out, _) in _linear(modules, sdxl):
        if d_out % block_size:
            continue
        levels = 1
        while levels < 3 and d_out % (block_size << levels) == 0:
            levels += 1
        sd[f"{n}.oft_blocks"] = (
            torch.randn(levels, d_out // block_size, block_size, block_size, generator=g) * 0.2
        )
        sd[f"{n}.rescale"] = 1 + 0.1 * torch.randn(d_out, 1, generator=g)
        if alpha is not None:
            sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def oftv2_lora(
    modules: list[Module], sdxl: bool = False, block_size: int = 4, seed: int = 0, share: bool = False
) -> dict[str, torch.Tensor]:
    """PEFT's OFT (v2) under kohya names: ``oft_R.weight`` (blocks of input columns or 1 shared,
    block_size * (block_size - 1) / 2) per 2-D weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (_, d_in) in _linear(modules, sdxl):
        if d_in % block_size:
            continue
        blocks = 1 if share else d_in // block_size
        sd[f"{n}.oft_R.weight"] = torch.randn(blocks, block_size * (block_size - 1) // 2, generator=g) * 0.2
    return sd


def ia3_lora(modules: list[Module], sdxl: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS (IA)^3: a vector per 2-D weight (``.weight``) and ``.on_input``; fc2-like layers on
    their inputs, the rest on their outputs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (n, (d_out, d_in)) in enumerate(_linear(modules, sdxl)):
        on_input = i % 2 == 1
        sd[f"{n}.weight"] = torch.randn(d_in if on_input else d_out, generator=g) * 0.3
        sd[f"{n}.on_input"] = torch.tensor(int(on_input))
    return sd


def lokr_lora(
    modules: list[Module], sdxl: bool = False, factor: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in modules:
        if len(m.shape) != 2 or m.shape[0] % factor or m.shape[1] % factor:
            continue
        n = kohya_name(m, sdxl)
        sd[f"{n}.lokr_w1"] = torch.randn(factor, factor, generator=g) * 0.3
        sd[f"{n}.lokr_w2_a"] = torch.randn(m.shape[0] // factor, 2, generator=g) * 0.3
        sd[f"{n}.lokr_w2_b"] = torch.randn(2, m.shape[1] // factor, generator=g) * 0.3
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    return sd


def with_dora(sd: dict[str, torch.Tensor], modules: list[Module], sdxl: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for m in modules:
        if len(m.shape) == 2:
            out[f"{kohya_name(m, sdxl)}.dora_scale"] = torch.rand(m.shape[0], 1, generator=g) + 0.5
    return out
