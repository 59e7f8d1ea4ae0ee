"""Load LoRA and Apply LoRA Stack on a scaled-fp8 checkpoint, loaded by ComfyUI core as it is.

0.12 loads such checkpoints as comfy-kitchen QuantizedTensors (``comfy_quant`` / ``weight_scale``
keys in the model's state dict); ModelPatcher hands the patch a dequantized copy and
re-quantizes the result (scale recalculated, stochastic rounding seeded per key). 0.3.x reads the
older ``scaled_fp8`` layout with its own ops (``scale_weight`` / ``scale_input``). On each, ours
must give core's weights, and the quantization keys must never pass for weights.
"""

from __future__ import annotations

import comfy.model_management
import comfy.sd
import comfy.supported_models as sm
import comfy.utils
import lora_factory as lf
import pytest
import quant_models as qm
import torch
from patch_compare import modules, write

from lora_foundry.nodes import comfy_bridge as bridge
from lora_foundry.nodes.load_lora import LoadLora
from lora_foundry.nodes.stack import ApplyLoraStack

STACK = (("quant_a.safetensors", 0.8), ("quant_b.safetensors", -0.5), ("quant_c.safetensors", 1.1))
# For a whole forward: at full strength these random LoRAs saturate the tiny UNet's attention, and
# its output then turns on float32 noise in the weights (2e-7 apart: outputs 7e-3 apart).
SMALL = (0.08, -0.05, 0.11)


@pytest.fixture(scope="module", params=qm.LAYOUTS)
def quantized(request, sd15, tmp_path_factory):
    """(MODEL loaded by core from a scaled-fp8 checkpoint of sd15's UNet, layout name)."""
    layout = request.param
    if layout == "metadata" and not hasattr(comfy.utils, "convert_old_quants"):
        pytest.skip("this ComfyUI (before 0.8) reads its own older mixed-precision keys, not weight_scale")
    path = qm.write_checkpoint(sd15, tmp_path_factory.mktemp("quant") / f"{layout}.safetensors", layout)
    return qm.load_checkpoint(path, sm.SD15), layout


@pytest.fixture(scope="module")
def quant_loras(sd15, loras_dir):
    mods = modules(sd15)
    for i, (name, _) in enumerate(STACK):
        write(loras_dir, name, lf.kohya_lora(lf.random_factors(mods, rank=4 * (i + 1), seed=80 + i)))
    return {name: comfy.utils.load_torch_file(str(loras_dir / name), safe_load=True) for name, _ in STACK}


def _quantized_layers(model) -> list:
    return [m for m in model.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and qm.is_quantized(m.weight)]  # fmt: skip


def test_the_checkpoint_loads_quantized(quantized, sd15):
    """Not moot: core built quantized layers, their values are the source weights within fp8's precision,
    and the model's state dict carries the quantization keys the pack must not take for weights."""
    model, _ = quantized
    layers = _quantized_layers(model)
    assert len(layers) > 100
    if hasattr(comfy.utils, "convert_old_quants"):
        assert all(type(m.weight).__name__ == "QuantizedTensor" for m in layers)
    source = dict(sd15.model.model.named_modules())
    for name, m in model.model.named_modules():
        if m in layers:
            w = source[name].weight
            assert (qm.dequantized(m) - w).abs().max() <= 0.07 * w.abs().max(), name  # e4m3: 3 mantissa bits
    suffixes = {k.rsplit(".", 1)[1] for k in model.model.state_dict()}
    assert suffixes & {"comfy_quant", "weight_scale", "scale_weight"}, suffixes


def test_quantization_keys_are_not_weights(quantized, sd15, quant_loras):
    """The shapes the loader checks LoRAs against are the model's weights and nothing else (each
    quantized weight at its logical shape), and a LoRA's report reads as on the unquantized model."""
    model, _ = quantized
    shapes, plain = bridge.weight_shapes(model), bridge.weight_shapes(sd15.model)
    weights = {k for k in shapes if k.endswith((".weight", ".bias"))}
    assert weights == {k for k in plain if k.endswith((".weight", ".bias"))}
    assert all(shapes[k] == plain[k] for k in weights)
    assert not [k for k in shapes if k.endswith((".comfy_quant", ".weight_scale", ".input_scale"))]
    name = STACK[0][0]
    report = LoadLora().execute(model, name, 0.8, 0.8, clip=sd15.clip)["result"][3]
    plain_report = LoadLora().execute(sd15.model, name, 0.8, 0.8, clip=sd15.clip)["result"][3]
    assert report == plain_report and "NOT applied" not in report and "unknown keys" not in report, report


def _loaded(patcher) -> dict[str, torch.Tensor]:
    """Every patched weight as ModelPatcher loads it (re-quantized), dequantized to float32."""
    comfy.model_management.unload_all_models()
    patcher.patch_model()
    modules_by_name = dict(patcher.model.named_modules())
    out = {}
    for key in patcher.patches:
        owner, _, leaf = key.rpartition(".")
        out[key] = qm.dequantized(modules_by_name[owner], leaf).clone()
    patcher.unpatch_model()
    return out


def _assert_core_weights(ours, core, base) -> None:
    """Equal but for rare values one fp8 step apart (the float32 sums differ in their last bits and the
    stochastic rounding, seeded alike, then lands on the neighbouring value); the LoRAs changed most."""
    assert set(ours) == set(core) and ours
    total = differ = changed = 0
    for key, w in ours.items():
        c = core[key]
        # one e4m3 step: 1/8 of the value, or below 2^-6 (subnormals) 2^-9, in units of the scale amax / 448
        subnormal = 1.01 * torch.maximum(w.abs().max(), c.abs().max()) / 448 * 2**-9
        step = torch.clamp(torch.maximum(w.abs(), c.abs()) * 0.125, min=subnormal)
        far = (w - c).abs() > step
        assert not far.any(), (
            f"{key}: {int(far.sum())} values, e.g. {w[far][:3].tolist()} vs {c[far][:3].tolist()}"
        )
        total += w.numel()
        # not float32 noise: 0.12 re-quantizes with scale = amax / 448, amax differing in its last bit
        differ += int(((w - c).abs() > 1e-5 * c.abs().max()).sum())
        changed += int((w != base[key]).sum())
    assert differ <= total * 2e-3, (differ, total)
    assert changed > total // 2, "the LoRAs changed too little: the comparison is moot"


def test_load_lora_equals_core(quantized, sd15, quant_loras):
    model, _ = quantized
    name, strength = STACK[1]
    ours, ours_clip, *_ = LoadLora().execute(model, name, strength, strength, clip=sd15.clip)["result"]
    core, core_clip = comfy.sd.load_lora_for_models(model, sd15.clip, quant_loras[name], strength, strength)
    with torch.inference_mode():  # as ComfyUI runs a graph
        _assert_core_weights(_loaded(ours), _loaded(core), _unpatched(model))
        clip_ours, clip_core = _loaded(ours_clip.patcher), _loaded(core_clip.patcher)
    assert all(torch.allclose(clip_ours[k], clip_core[k], atol=1e-5) for k in clip_core)


def test_apply_lora_stack_equals_chained_core(quantized, sd15, quant_loras):
    model, _ = quantized
    entries = [(name, s, s) for name, s in STACK]
    ours = ApplyLoraStack().execute(model, entries, clip=sd15.clip)["result"][0]
    core = model
    for name, s, _ in entries:
        core = comfy.sd.load_lora_for_models(core, None, quant_loras[name], s, 0)[0]
    with torch.inference_mode():
        base = _unpatched(model)
        _assert_core_weights(_loaded(ours), _loaded(core), base)


def _unpatched(model) -> dict[str, torch.Tensor]:
    """Every weight of the quantized model as stored, dequantized to float32."""
    return {
        f"{name}.{leaf}": qm.dequantized(m, leaf).clone()
        for name, m in model.model.named_modules()
        for leaf in ("weight", "bias")
        if isinstance(getattr(m, leaf, None), torch.Tensor)
    }


@pytest.mark.timeout(600)
def test_partial_load_on_the_quantized_base(quantized, sd15, quant_loras):
    """Low-VRAM: each layer dequantized and patched at the forward (LowVramPatch; 0.3.x re-quantizes
    the result to fp8 there). The stack's UNet output is core's chain's but for float32 noise (and
    there fp8 steps), far from the base model's."""
    model, _ = quantized
    entries = [(name, s, s) for (name, _), s in zip(STACK, SMALL, strict=True)]
    ours = ApplyLoraStack().execute(model, entries)["result"][0]
    core = model
    for name, s, _ in entries:
        core = comfy.sd.load_lora_for_models(core, None, quant_loras[name], s, 0)[0]
    g = torch.Generator().manual_seed(6)
    x, t, ctx = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 77, 64, generator=g),
    )
    comfy.model_management.unload_all_models()

    def forward(patcher):
        patcher.patch_model(lowvram_model_memory=1)
        on_the_fly = sum(1 for m in patcher.model.modules() if getattr(m, "weight_function", None))
        with torch.no_grad():
            out = patcher.model.diffusion_model(x, t, context=ctx).float()
        patcher.unpatch_model()
        return out, on_the_fly

    (got, on_the_fly), (theirs, _) = forward(ours), forward(core)
    assert on_the_fly > 50, "the model was not loaded in low-VRAM mode: test is moot"
    lora_effect = (theirs - forward(model)[0]).abs().max().item()
    assert lora_effect > 0.05, "the LoRAs changed too little: the comparison is moot"
    assert (got - theirs).abs().max().item() <= 0.01 * lora_effect


def _graph_run(patcher) -> None:
    """What one queued prompt does to the MODEL: its loads and unloads happen in inference mode."""
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([patcher])
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("layout", qm.LAYOUTS)
def test_load_lora_twice_in_patch_mode_as_the_executor_runs_it(layout, sd15, quant_loras, tmp_path):
    """Issue #19's 0.12.1 report "Cannot set version_counter for inference tensor" after an fp8 reload:
    two prompts, each Load LoRA in patch mode at another strength, loaded and unloaded in inference mode
    as ComfyUI's executor does, load the fp8 base without error and leave it restored after each."""
    if layout == "metadata" and not hasattr(comfy.utils, "convert_old_quants"):
        pytest.skip("this ComfyUI (before 0.8) reads its own older mixed-precision keys, not weight_scale")
    model = qm.load_checkpoint(qm.write_checkpoint(sd15, tmp_path / f"{layout}.safetensors", layout), sm.SD15)
    with torch.inference_mode():
        base = _unpatched(model)
    name = STACK[0][0]
    for strength in (0.8, 0.3):
        with torch.inference_mode():  # the executor runs the node in inference mode too
            patcher = LoadLora().execute(model, name, strength, 0.0, clip=sd15.clip)["result"][0]
        assert patcher.patches
        _graph_run(patcher)
        with torch.inference_mode():
            after = _unpatched(model)
        assert all(torch.equal(after[k], base[k]) for k in base), "the base was not restored"


def test_the_version_counter_error_is_core_s_own(sd15, tmp_path):
    """Where the 0.12.1 error comes from (docs/load_lora.md): a scaled-fp8 model loaded in inference mode and
    unloaded outside it (autograd on) fails its next load, with no LoRA at all: core's ops re-wrap the
    QuantizedTensor weights as Parameters (comfy/ops.py _apply). Ours never unloads outside inference mode
    on Load LoRA's path (the test above). When core fixes this, this test fails: drop the docs note."""
    if not hasattr(comfy.utils, "convert_old_quants"):
        pytest.skip("ComfyUI before 0.8 has no QuantizedTensor weights; the sequence passes there (0.3.75)")
    model = qm.load_checkpoint(qm.write_checkpoint(sd15, tmp_path / "plain.safetensors", "metadata"), sm.SD15)
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model.clone()])
    comfy.model_management.unload_all_models()  # outside inference mode
    with (
        pytest.raises(RuntimeError, match="Cannot set version_counter for inference tensor"),
        torch.inference_mode(),
    ):
        comfy.model_management.load_models_gpu([model.clone()])
    comfy.model_management.unload_all_models()
