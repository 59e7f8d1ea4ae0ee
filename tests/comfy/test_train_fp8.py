"""Training on a base stored in fp8, on both ComfyUI legs: UNETLoader's weight_dtype fp8_e4m3fn
(plain float8_e4m3fn weights, cast per forward) and a scaled-fp8 checkpoint as ComfyUI core loads it
(0.12.1: comfy-kitchen QuantizedTensors, from either file layout; 0.3.x: the older ``scaled_fp8``
layout with its own ops). On a tiny Flux the LoRA learns (loss on fixed triples below half its
start), its weights stay float32, the base keeps its stored form, and a layer whose stored form
gives no gradient is refused with an error naming the layer and the form."""

from __future__ import annotations

import types

import comfy.lora
import comfy.model_management
import comfy.supported_models as sm
import comfy.utils
import model_factory
import pytest
import quant_models as qm
import safetensors.torch
import torch
from flow_data import Data, FixedTriples, flux_dataset, run_hooks
from train_run import train_model

from lora_foundry.lora_core.train.network import LoraNetwork, select_targets
from lora_foundry.lora_core.train.trainer import TrainConfig, Trainer
from lora_foundry.nodes import comfy_bridge_dit as dit_bridge
from lora_foundry.nodes import comfy_bridge_train as train_bridge
from lora_foundry.nodes.train import model_targets

QUANTIZED_0_12 = hasattr(comfy.utils, "convert_old_quants")  # 0.8+ loads scaled fp8 as QuantizedTensors


# one torch thread: these tiny models train in reproducible order and leave the cores to others
pytestmark = pytest.mark.usefixtures("one_thread")


def scaled_fp8_flux(tmp_path, layout: str):
    """A tiny Flux written as a scaled-fp8 checkpoint (every Linear weight fp8 with its scale) and
    loaded by core's checkpoint loader (detection told the tiny config, as tests/quant_models does)."""
    flux = model_factory.flux_model(seed=0)
    config = dict(flux.model.model_config.unet_config)
    path = qm.write_checkpoint(types.SimpleNamespace(model=flux), tmp_path / f"{layout}.safetensors", layout)
    return qm.load_checkpoint(path, lambda _detected: sm.Flux(config))


def fixed_triple_run(patcher, steps: int = 40):
    """(losses, network) of a rank-4 attention+MLP LoRA trained on two fixed flow triples of the
    tiny Flux (memorisation), after the model is prepared as Train LoRA prepares it."""
    train_bridge.prepare_for_training(patcher)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    cond = {"context": torch.randn(2, 4, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    s = torch.tensor([0.25, 0.7])
    b = s[:, None, None, None]
    net = LoraNetwork(select_targets(model_targets(patcher), "attention_ff"), rank=4, alpha=4.0, seed=0)
    trainer = Trainer(
        TrainConfig(steps=steps, batch_size=2, lr=1e-2, seed=0),
        Data(x0, cond),
        train_bridge.flow_predictor(patcher),
        FixedTriples((1 - b) * x0 + b * eps, eps - x0, s),
        net,
    )
    net.attach()
    try:
        losses = run_hooks(patcher, lambda: [trainer.train_step().loss for _ in range(steps)])
    finally:
        net.detach()
        comfy.model_management.unload_all_models()
    return losses, net


def train_flux(patcher, **changes):
    """Train LoRA (the node, inside inference_mode as ComfyUI runs it) on three random Flux-shaped
    latents and caption embeddings."""
    return train_model(patcher, flux_dataset(3), unique_id="5", **changes)


def _qkv(patcher):
    return patcher.model.diffusion_model.double_blocks[0].img_attn.qkv


@pytest.mark.timeout(600)
def test_fp8_stored_base_halves_the_loss_with_float32_lora():
    """UNETLoader's weight_dtype fp8_e4m3fn: every weight of the DiT stored as float8_e4m3fn."""
    patcher = model_factory.flux_model(seed=0, dtype=torch.float8_e4m3fn)
    assert _qkv(patcher).weight.dtype == torch.float8_e4m3fn
    losses, net = fixed_triple_run(patcher)
    assert losses[-1] < 0.5 * losses[0], losses
    names = set(net.branches)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(p.abs().max() > 0 for n, p in net.named_parameters() if n.endswith("up"))
    assert _qkv(patcher).weight.dtype == torch.float8_e4m3fn  # trained through, never rewritten


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", qm.LAYOUTS)
def test_scaled_fp8_checkpoint_halves_the_loss_with_float32_lora(tmp_path, layout):
    if layout == "metadata" and not QUANTIZED_0_12:
        pytest.skip("ComfyUI before 0.8 reads its own older mixed-precision keys, not weight_scale")
    patcher = scaled_fp8_flux(tmp_path, layout)
    layer = _qkv(patcher)
    assert qm.is_quantized(layer.weight)
    if QUANTIZED_0_12:  # both layouts load as QuantizedTensors in a Linear that is no torch Linear
        assert type(layer.weight).__name__ == "QuantizedTensor"
        assert not isinstance(layer, torch.nn.Linear)
    before = qm.dequantized(layer).clone()
    losses, net = fixed_triple_run(patcher)
    assert losses[-1] < 0.5 * losses[0], losses
    assert "lora_unet_double_blocks_0_img_attn_qkv" in net.branches
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert qm.is_quantized(_qkv(patcher).weight)
    torch.testing.assert_close(qm.dequantized(_qkv(patcher)), before, rtol=0, atol=0)


@pytest.mark.timeout(600)
def test_train_lora_node_on_a_scaled_fp8_flux_saves_a_file_core_loads(tmp_path, loras_dir):
    """The node end to end on the scaled-fp8 base this ComfyUI loads as quantized (0.12: QuantizedTensor)."""
    patcher = scaled_fp8_flux(tmp_path, "metadata" if QUANTIZED_0_12 else "scaled_fp8")
    out = train_flux(patcher, output_name="flux_scaled_fp8", steps=2, lr=1e-2, save_dtype="fp32")
    sd = safetensors.torch.load_file(str(loras_dir / out["result"][2]))
    modules = {k.split(".")[0] for k in sd}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in modules
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)
    loaded = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    assert len(loaded) == len(modules)


class Int8Linear(torch.nn.Linear):
    """A weight-only int8 Linear that computes in integers (as int8 quantization schemes do on
    hardware with integer matrix units): its output is detached from its input."""

    def forward(self, x):
        scale = x.detach().abs().amax().clamp_min(1e-8) / 127
        q = (x.detach() / scale).round().to(torch.int32)
        return (q @ self.weight.to(torch.int32).t()).float() * scale + (
            self.bias.detach() if self.bias is not None else 0
        )


@pytest.mark.timeout(300)
def test_a_form_gradients_cannot_pass_is_refused_by_name(loras_dir):
    patcher = model_factory.flux_model(seed=0)
    block = patcher.model.diffusion_model.double_blocks[1].img_attn
    q = Int8Linear(block.qkv.in_features, block.qkv.out_features)
    with torch.no_grad():
        q.weight = torch.nn.Parameter(
            torch.randint(-127, 128, q.weight.shape, dtype=torch.int8), requires_grad=False
        )
    block.qkv = q
    with pytest.raises(
        RuntimeError,
        match=r"\[Train LoRA\] layer lora_unet_double_blocks_1_img_attn_qkv \(Int8Linear\) keeps its weight as "
        r"int8 tensor, which training cannot backpropagate through \(its output carries no gradient\)",
    ):
        train_flux(patcher, output_name="int8_try", steps=1)
    assert not list(loras_dir.glob("int8_try*"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_recast_linears_give_the_same_gradients_and_are_used(dtype, autocast):
    """recast_frozen_linears (the cast weight is not kept for backward): every plain-cast Linear of
    the model runs through it, and the LoRA gradients equal those of ComfyUI's own forward, in
    float32 and under autocast bf16 (Train LoRA's bf16 precision)."""
    from lora_foundry.lora_core.train import hooks

    patcher = model_factory.flux_model(seed=0, dtype=dtype)
    train_bridge.prepare_for_training(patcher)
    net = LoraNetwork(select_targets(model_targets(patcher), "attention_ff"), rank=4, alpha=4.0, seed=0)
    with torch.no_grad():
        for branch in net.branches.values():
            branch.up.normal_(generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond = {"context": torch.randn(1, 4, 32, generator=g), "pooled": torch.randn(1, 32, generator=g)}
    predict = train_bridge.flow_predictor(patcher)
    linears = dit_bridge.plain_cast_linears(patcher)
    assert len(linears) > 20
    grads, calls = [], []
    for recast in (False, True):
        undo = hooks.recast_frozen_linears(linears) if recast else (lambda: None)
        count = [0]
        original = hooks._RecastLinear.apply

        def counted(*args, _original=original, _count=count):
            _count[0] += 1
            return _original(*args)

        hooks._RecastLinear.apply = counted
        net.attach()
        net.zero_grad()
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                run_hooks(
                    patcher, lambda: predict(x, torch.tensor([0.5]), cond).float().square().mean().backward()
                )
        finally:
            net.detach()
            undo()
            hooks._RecastLinear.apply = original
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        calls.append(count[0])
    assert calls[0] == 0 and calls[1] > len(linears)  # every one, block layers again in the recompute
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in linears)  # undone
    comfy.model_management.unload_all_models()
