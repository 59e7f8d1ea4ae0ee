"""Training targets from a model's key map: the weights a LoRA file can address, as Targets named
the way the family's trainers write them.

The caller (the bridge) hands over three plain things: the key map (file names -> model weight
keys, as ComfyUI's loader reads them), the module those keys are paths in, and the naming style.
Choosing names here, from the same map the loaders read, means every trained key is one a
loader matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from torch import nn

from ..apply.keymap import kohya_names
from .network import Target

# kohya: sd-scripts' lora_unet_ / lora_te_ names, diffusers-style UNet paths (SD1.x / SD2.x) and
# sd-scripts' own paths for DiTs (Flux: lora_unet_double_blocks_0_img_attn_qkv);
# kohya_sgm: SGM / LDM UNet paths (SDXL: lora_unet_input_blocks_4_1_...), as sd-scripts trains SDXL.
NamingStyle = Literal["kohya", "kohya_sgm"]
NAMING_STYLES: tuple[str, ...] = get_args(NamingStyle)


def targets_from_key_map(
    key_map: Mapping[str, object], root: nn.Module, style: NamingStyle = "kohya"
) -> list:
    """Every weight of ``root`` that ``key_map`` names, as a Target under its ``style`` name.

    Entries whose target is not a plain ``.weight`` key (ComfyUI maps some names to slices of fused
    weights) and keys the module lacks (the map also names weights a model may not have) are left
    out: a LoRA branch needs one whole layer.
    """
    if style not in NAMING_STYLES:
        raise ValueError(f"naming style should be one of {', '.join(NAMING_STYLES)}, got {style!r}")
    present = set(root.state_dict())
    named = {
        n: k for n, k in key_map.items() if isinstance(k, str) and k.endswith(".weight") and k in present
    }
    out = []
    for key, name in kohya_names(named, sgm_unet=style == "kohya_sgm").items():
        path = key[: -len(".weight")]
        out.append(Target(name, path, root.get_submodule(path)))
    return out
