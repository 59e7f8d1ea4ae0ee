"""LoRA files written by diffusers + PEFT themselves, on tiny diffusers transformers shaped like the
tiny ComfyUI DiTs of scripts/dit_factory.py: the ``transformer.`` PEFT layout that diffusers'
``save_lora_weights`` writes (and SimpleTuner and ai-toolkit's diffusers exports with it)."""

from __future__ import annotations

import torch

# family -> (diffusers model class, config, pipeline whose save_lora_weights writes the file)
PEERS = {
    "flux2": ("Flux2Transformer2DModel", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
              mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8)), "Flux2Pipeline"),
    "chroma": ("ChromaTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
               approximator_num_channels=16, approximator_hidden_dim=64, approximator_layers=1), "ChromaPipeline"),
    "zimage": ("ZImageTransformer2DModel", dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64,
               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
               axes_lens=[64, 32, 32]), "ZImagePipeline"),
    "qwen_image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12)),
                   "QwenImagePipeline"),
    "wan": ("WanTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2), "WanPipeline"),
    "ltxv": ("LTXVideoTransformer3DModel", dict(in_channels=128, out_channels=128, num_attention_heads=2,
             attention_head_dim=32, cross_attention_dim=64, num_layers=2, caption_channels=32), "LTXPipeline"),
    "hidream": ("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                num_single_layers=2, attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 32],
                text_emb_dim=32, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(16, 8, 8),
                max_resolution=(16, 16), llama_layers=[0, 1]), "HiDreamImagePipeline"),
}  # fmt: skip


# Tiny diffusers transformers shaped like the tiny ComfyUI models Train LoRA trains in the tests, where
# those are not the ones of PEERS: SD3 as model_factory.sd3_model() (depth 2: 2 heads of 64, width 128),
# Flux as model_factory.flux_model() (2 heads of 32, 2 + 2 blocks), Z-Image 256 wide as
# dit_factory.ZIMAGE_TRAINABLE (its feed-forward is 688 wide in ComfyUI, rounded to a multiple of 16,
# and 682 in diffusers, so only its attention compares).
TRAINED = {
    "sd3": ("SD3Transformer2DModel", dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=64), "StableDiffusion3Pipeline"),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
             attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
             guidance_embeds=True, axes_dims_rope=(8, 12, 12)), "FluxPipeline"),
    "zimage": ("ZImageTransformer2DModel", dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256,
               n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[32, 48, 48],
               axes_lens=[64, 32, 32]), "ZImagePipeline"),
}  # fmt: skip


def trained_peer(family: str) -> tuple[str, dict, str]:
    """(diffusers class, config, pipeline) of the tiny diffusers transformer shaped like the tiny
    ComfyUI model Train LoRA trains for ``family`` in the tests (dit_files.trained_model)."""
    return TRAINED.get(family) or PEERS[family]


def peft_lora_file(
    family: str, folder, shapes, seed: int, rank: int = 4, alpha: float = 2.0, header_alpha: bool = False
) -> tuple:
    """Writes diffusers' LoRA file for ``family`` into ``folder`` with PEFT's adapter on every Linear
    of the diffusers model whose module path ``shapes`` accepts (path -> the ComfyUI weight shape it
    must have; a callable returning None leaves the module out); ``header_alpha``: the PEFT config (and
    so lora_alpha) in the header, as diffusers' training scripts save it. Returns (file path,
    {module: (A, B)})."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cls_name, config, pipe = PEERS[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n, m in linears.items() if shapes(n) == tuple(m.weight.shape)]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(cfg, model)
    sd = get_peft_model_state_dict(model)
    header = {"transformer_lora_adapter_metadata": cfg.to_dict()} if header_alpha else {}
    getattr(diffusers, pipe).save_lora_weights(
        str(folder), transformer_lora_layers=sd, safe_serialization=True, **header
    )
    pairs = {n: (sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"]) for n in targets}
    return folder / "pytorch_lora_weights.safetensors", pairs
