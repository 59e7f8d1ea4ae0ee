"""Adapter kinds: one module per kind (record, key suffixes, build, fit error, delta / apply) and the
registry every caller goes through. The names below are the package's public face."""

from .base import BadLayout, Built, Kind, Shape
from .boft import BoftAdapter, boft_fit_error
from .diff import DiffAdapter
from .dora import dora_error, peft_dora_fit_error, weight_decompose
from .glora import GloraAdapter
from .ia3 import Ia3Adapter, ia3_fit_error
from .loha import LohaAdapter
from .lokr import LokrAdapter
from .lora import LoraAdapter, padded, scaled_factors
from .oft import OftAdapter
from .oft_peft import OftV2Adapter, oftv2_block_size, oftv2_fit_error
from .registry import KINDS, apply, delta, is_linear, kind_of, rank_of, scale_of, shape_error
from .set_weight import SetAdapter

Adapter = (
    LoraAdapter
    | LohaAdapter
    | LokrAdapter
    | DiffAdapter
    | SetAdapter
    | OftAdapter
    | BoftAdapter
    | GloraAdapter
    | Ia3Adapter
    | OftV2Adapter
)

__all__ = [
    "KINDS", "Adapter", "BadLayout", "BoftAdapter", "Built", "DiffAdapter", "GloraAdapter", "Ia3Adapter",
    "Kind", "LohaAdapter", "LokrAdapter", "LoraAdapter", "OftAdapter", "OftV2Adapter", "SetAdapter", "Shape",
    "apply", "boft_fit_error", "delta", "dora_error", "ia3_fit_error", "is_linear", "kind_of", "oftv2_block_size",
    "oftv2_fit_error", "padded", "peft_dora_fit_error", "rank_of", "scale_of", "scaled_factors", "shape_error",
    "weight_decompose",
]  # fmt: skip
