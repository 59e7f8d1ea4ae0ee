"""Text-encoder module names as transformers 5 writes them, and their transformers 4 spelling.

transformers 5 removed the ``text_model`` level from ``CLIPTextModel`` (its weight-loading map
lists ``PrefixChange(prefix_to_remove="text_model")`` for that class), so a LoRA saved from such a
model names ``encoder.layers.0.self_attn.q_proj`` where files made under transformers 4 name
``text_model.encoder.layers.0.self_attn.q_proj``. ``CLIPTextModelWithProjection`` (SDXL's second
encoder, SD3's two CLIPs in diffusers) still holds a ``text_model`` attribute, but anything built
on a bare ``CLIPTextModel`` (a trainer's own SDXL loader, kohya-style names built from its module
paths) comes out flat. ComfyUI's key maps only know the transformers 4 paths, so a flat name is
read as its transformers 4 spelling. T5 never had such a level (``encoder.block.N``), so only CLIP's
``encoder.layers.N`` is rewritten: nothing else can be caught by mistake.
"""

from __future__ import annotations

from collections.abc import Iterable

NAMING_TF5 = "transformers 5"

# Where a CLIP encoder's module path starts, per spelling. Dotted names carry the diffusers / PEFT
# component first (``text_encoder.``, ``text_encoder_2.``, ``base_model.model.``); kohya names
# carry their own prefix (``lora_prior_te_`` is Stable Cascade's) and underscores.
_DOTTED_FLAT = "encoder.layers."
_DOTTED_COMPONENTS = ("text_encoder.", "text_encoder_2.", "base_model.model.")
_KOHYA_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_prior_te_")
_KOHYA_FLAT = "encoder_layers_"


def te4_name(name: str) -> str | None:
    """The transformers 4 spelling of a transformers 5 text-encoder module name, else None.

    ``text_encoder.encoder.layers.0.self_attn.q_proj`` -> ``text_encoder.text_model.encoder...``,
    ``lora_te1_encoder_layers_0_mlp_fc1`` -> ``lora_te1_text_model_encoder_layers_0_mlp_fc1``;
    names already in the transformers 4 spelling, and every other name, give None.
    """
    for component in _DOTTED_COMPONENTS:
        if name.startswith(component + _DOTTED_FLAT):
            return component + "text_model." + name[len(component) :]
    for prefix in _KOHYA_PREFIXES:
        if name.startswith(prefix + _KOHYA_FLAT):
            return prefix + "text_model_" + name[len(prefix) :]
    return None


def kohya_te4_name(name: str) -> str:
    """A kohya module name as this pack writes it: transformers 5 text-encoder names (``lora_te_encoder_
    layers_...``) take back the ``text_model`` level every kohya reader expects; others are unchanged."""
    if name.startswith(_KOHYA_PREFIXES):
        renamed = te4_name(name)
        if renamed is not None:
            return renamed
    return name


def naming_note(names: Iterable[str]) -> tuple[str, ...]:
    """The report's line about modules read through their transformers 4 spelling (none: no line)."""
    names = sorted(names)
    if not names:
        return ()
    return (
        f"{len(names)} text-encoder modules are named as {NAMING_TF5} writes them, without the "
        f"'text_model' level (e.g. {names[0]}); read as the transformers 4 names ComfyUI maps "
        f"(e.g. {te4_name(names[0])})",
    )
