"""Gradient checkpointing in Train LoRA recomputes for real: on ComfyUI's own SD1.5 UNet and Flux
DiT, every adapted layer inside a checkpointed unit runs twice per step (forward, and again during
backward), and the LoRA gradients equal those of the run without checkpointing. Wrapping the UNet's
TimestepEmbedSequential blocks instead (what Train LoRA did before) recomputes nothing: the same
count shows it, so the check can fail."""

from __future__ import annotations

import pytest
import torch

from lora_foundry.lora_core.train.network import LoraNetwork, checkpoint_forward, select_targets
from lora_foundry.nodes import comfy_bridge_dit as dit_bridge
from lora_foundry.nodes.train import block_hooks, model_targets


def inputs(family: str):
    g = torch.Generator().manual_seed(3)
    if family == "sd15":
        x = torch.randn(1, 4, 8, 8, generator=g)
        return x, torch.tensor([5.0]), {"c_crossattn": torch.randn(1, 77, 64, generator=g)}
    x = torch.randn(1, 16, 8, 8, generator=g)
    extra = {"c_crossattn": torch.randn(1, 4, 32, generator=g), "y": torch.randn(1, 32, generator=g),
             "guidance": torch.tensor([1.0])}  # fmt: skip
    return x, torch.tensor([0.6]), extra


def run(patcher, family: str, units) -> tuple[dict, dict]:
    """(forward calls per adapted layer, LoRA gradients) of one forward + backward with a LoRA whose
    up matrices are non-zero (so every branch gets a gradient). ``units``: None, Train LoRA's
    hooks without checkpointing; True, with it; a list: only those modules checkpointed."""
    model = patcher.model
    targets = [
        t for t in select_targets(model_targets(patcher), "attention_ff") if t.path.startswith("diffusion")
    ]
    net = LoraNetwork(targets, rank=2, alpha=2.0, seed=1)
    with torch.no_grad():
        for i, b in enumerate(net.branches.values()):
            b.up.copy_(torch.randn(b.up.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    calls = {t.name: 0 for t in targets}
    counters = [
        t.module.register_forward_pre_hook(lambda *_a, n=t.name: calls.__setitem__(n, calls[n] + 1))
        for t in targets
    ]
    if units is None or units is True:
        undo = block_hooks(patcher, checkpointing=units is True)
    else:
        undo = [checkpoint_forward(units)]
    net.attach()
    try:
        x, sigma, extra = inputs(family)
        with torch.enable_grad():
            model.apply_model(x, sigma, **extra).square().mean().backward()
    finally:
        net.detach()
        for fn in undo:
            fn()
        for h in counters:
            h.remove()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return calls, grads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_checkpointed_blocks_recompute_and_give_the_same_gradients(request, family):
    models = request.getfixturevalue(family)
    patcher = models.model if family == "sd15" else models
    units = dit_bridge.checkpoint_blocks(patcher)
    assert units and all(isinstance(u, torch.nn.Module) for u in units)
    plain_calls, plain_grads = run(patcher, family, None)
    ckpt_calls, ckpt_grads = run(patcher, family, True)  # Train LoRA's own hooks, checkpointing on
    assert set(plain_calls.values()) == {1}
    inside = {n for n, t in plain_calls.items()}
    assert {n: ckpt_calls[n] for n in inside} == {n: 2 for n in inside}, "a layer was not recomputed"
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any(g.abs().max() > 0 for g in plain_grads.values())
    for name, g in plain_grads.items():
        # the same float32 math, reordered sums in recomputed kernels: equal to rounding noise
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
    assert not any("forward" in m.__dict__ for m in patcher.model.modules()), "checkpointing left a patch"


@pytest.mark.timeout(300)
def test_wrapping_the_unets_block_containers_recomputes_nothing(sd15):
    """The check above fails on the old wrapping: ComfyUI's UNet hands each TimestepEmbedSequential
    to forward_timestep_embed and never calls its forward."""
    net = sd15.model.model.diffusion_model
    containers = [*net.input_blocks, net.middle_block, *net.output_blocks]
    calls, _ = run(sd15.model, "sd15", containers)
    assert set(calls.values()) == {1}


def test_dit_units_are_its_transformer_blocks(flux):
    net = flux.model.diffusion_model
    units = dit_bridge.checkpoint_blocks(flux)
    assert units == [*net.double_blocks, *net.single_blocks]


def test_training_rope_equals_comfyuis_and_is_undone():
    """The rope used while gradients are on rotates as ComfyUI's own (kitchen op on 0.12, plain
    torch on 0.3.75) does, carries gradients, and the undo restores ComfyUI's function."""
    import comfy.ldm.flux.math as fm

    original = fm.apply_rope
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    freqs = fm.rope(torch.arange(6.0)[None], 8, 10000)[:, None]  # (1, 1, 6, 4, 2, 2)
    with torch.no_grad():
        want = original(q, k, freqs)
    undo = dit_bridge.differentiable_rope()
    try:
        q_leaf = q.clone().requires_grad_(True)
        with torch.enable_grad():
            got = fm.apply_rope(q_leaf, k, freqs)
            got[0].sum().backward()
    finally:
        undo()
    assert fm.apply_rope is original
    torch.testing.assert_close(got[0].detach(), want[0])
    torch.testing.assert_close(got[1].detach(), want[1])
    assert q_leaf.grad is not None and q_leaf.grad.abs().sum() > 0
