"""LoRA injection: target selection, identity at step 0, the branch equals the merged-weight math
of lora_core.adapters (plain, conv, DoRA), hooks removed cleanly, LoRA+ groups, checkpointing."""

import pytest
import torch
from torch import nn
from unit.train_helpers import (
    CTX,
    TOKENS,
    TinyUNet,
    one_thread,  # noqa: F401
    predictor,
    targets,
)

from lora_foundry.lora_core.adapters import LoraAdapter, apply
from lora_foundry.lora_core.train.network import (
    LoraNetwork,
    Target,
    checkpoint_forward,
    parse_blocks,
    select_targets,
)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 4, 4, generator=g),
        torch.tensor([10, 700]),
        {"context": torch.randn(2, TOKENS, CTX, generator=g)},
    )


def _names(model, preset, blocks=""):
    return {t.path.split("transformer_blocks.0.")[-1] for t in select_targets(targets(model), preset, blocks)}


def test_presets_select_expected_layers():
    model = TinyUNet()
    attn = {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert _names(model, "attention") == attn
    assert _names(model, "attention_ff") == attn | {"ff.net.0.proj", "ff.net.2"}
    linear = _names(model, "all_linear")
    assert "input_blocks.1.1.proj_in" in linear and "time_embed" in linear and "out" not in linear
    assert {"out", "input_blocks.0.0"} <= _names(model, "all_linear_conv")


def test_block_selection():
    model = TinyUNet()
    assert parse_blocks("") is None
    assert parse_blocks("in4-5, mid,out0") == {"IN04", "IN05", "MID", "OUT00"}
    assert _names(model, "attention", "in1") == _names(model, "attention")
    with pytest.raises(ValueError, match="no layers to train"):
        LoraNetwork(select_targets(targets(model), "attention", "out3"), rank=2, alpha=2)
    with pytest.raises(ValueError, match="`blocks` entry 'FOO'"):
        parse_blocks("foo")
    with pytest.raises(ValueError, match="`targets` should be one of"):
        select_targets(targets(model), "everything")


@pytest.mark.parametrize("dora", [False, True])
def test_step_zero_is_identity_and_detach_restores(dora):
    model = TinyUNet()
    x, t, cond = _inputs()
    predict = predictor(model)
    before = predict(x, t, cond)
    net = LoraNetwork(select_targets(targets(model), "all_linear_conv"), rank=4, alpha=2, dora=dora, seed=1)
    assert all(torch.count_nonzero(b.up) == 0 for b in net.branches.values())
    assert all(b.down.abs().max() > 0 for b in net.branches.values())
    net.attach()
    assert torch.allclose(predict(x, t, cond), before, atol=1e-6 if dora else 0)
    with torch.no_grad():
        for b in net.branches.values():
            b.up.normal_()
    assert not torch.allclose(predict(x, t, cond), before, atol=1e-3)
    net.detach()
    assert torch.equal(predict(x, t, cond), before)


def _branch_vs_merged(module: nn.Module, x: torch.Tensor, dora: bool):
    target = Target("lora_unet_m", "m", module)
    net = LoraNetwork([target], rank=3, alpha=1.5, dora=dora, seed=0)
    branch = net.branches["lora_unet_m"]
    with torch.no_grad():
        branch.up.normal_()
        if dora:
            branch.magnitude.mul_(torch.rand_like(branch.magnitude) + 0.5)
    net.attach()
    hooked = module(x)
    net.detach()
    e = net.export()["lora_unet_m"]
    adapter = LoraAdapter(up=e["up"], down=e["down"], alpha=float(e["alpha"]), dora_scale=e.get("dora_scale"))
    merged = type(module).__new__(type(module))
    merged.__dict__ = dict(module.__dict__)
    merged._parameters = dict(module._parameters, weight=nn.Parameter(apply(adapter, module.weight.detach())))
    return hooked, merged(x)


@pytest.mark.parametrize("dora", [False, True])
def test_linear_branch_equals_merged_weight(dora):
    torch.manual_seed(0)
    hooked, merged = _branch_vs_merged(nn.Linear(12, 7), torch.randn(5, 12), dora)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_conv_branch_equals_merged_weight(dora):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    hooked, merged = _branch_vs_merged(conv, torch.randn(2, 6, 9, 9), dora)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-5)


def test_export_shapes_and_loraplus_groups():
    model = TinyUNet()
    net = LoraNetwork(select_targets(targets(model), "all_linear_conv"), rank=2, alpha=4, dora=True)
    e = net.export()["lora_unet_input_blocks_0_0"]
    assert e["down"].shape == (2, 4, 3, 3) and e["up"].shape == (16, 2, 1, 1)
    assert e["dora_scale"].shape == (1, 4, 1, 1) and float(e["alpha"]) == 4
    groups = net.param_groups(1e-4, up_ratio=16)
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1.6e-3)
    assert len(groups[1]["params"]) == len(net.branches)
    assert len(groups[0]["params"]) == 2 * len(net.branches)  # down + magnitude


def test_checkpointing_same_gradients():
    model = TinyUNet()
    x, t, cond = _inputs()
    net = LoraNetwork(select_targets(targets(model), "attention"), rank=2, alpha=2)
    with torch.no_grad():
        for b in net.branches.values():
            b.up.normal_()
    net.attach()
    model.requires_grad_(False)

    def grads():
        for p in net.parameters():
            p.grad = None
        predictor(model)(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    undo = checkpoint_forward([model.input_blocks[1][1]])
    checked = grads()
    undo()
    assert "forward" not in model.input_blocks[1][1].__dict__
    for a, b in zip(plain, checked, strict=True):
        torch.testing.assert_close(a, b)


def test_tiny_unet_runs():
    model = TinyUNet()
    out = model(torch.randn(2, 4, 4, 4), torch.tensor([1, 500]), torch.randn(2, TOKENS, CTX))
    assert out.shape == (2, 4, 4, 4)
