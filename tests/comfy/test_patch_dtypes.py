"""The per-forward patch: FoundryPatch on float16 / bfloat16 weights, through ComfyUI's own paths.

LowVramPatch (a partial low-VRAM load, and every patched weight under 0.12's dynamic VRAM)
patches a weight at every forward, in the dtype the layer computes in; since 0.8 the one-time
patch also works in ``lora_compute_dtype`` (float16 on most CUDA GPUs). Each test drives the real
ComfyUI path on the CPU and compares ours with core's chained loaders on the same stack, and both
with a float64 reference (core's own adapters run in float64 on the same input weight).
"""

from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import lora_factory as lf
import pytest
import torch
from alloc_peak import peak_bytes
from patch_compare import modules, write

from lora_foundry.nodes import comfy_bridge
from lora_foundry.nodes.stack import ApplyLoraStack

HALF = [torch.bfloat16, torch.float16]
# Three LoRAs of different ranks and file dtypes, each at its own strength (the coefficients are
# folded into the factors) and the same three at one strength (passed to the GEMM as alpha).
RANKS = ((4, torch.float32), (8, torch.float16), (16, torch.float32))
STRENGTHS = {"own": (0.8, -0.5, 1.1), "shared": (0.7, 0.7, 0.7)}
# For a whole forward: at full strength these random LoRAs saturate the tiny UNet's attention, and
# its half-precision output then turns on single rounding steps (core against itself included).
SMALL = (0.08, -0.05, 0.11)


@pytest.fixture(scope="module")
def files(sd15, loras_dir):
    mods = modules(sd15)
    out = {}
    for i, (rank, dtype) in enumerate(RANKS):
        sd = lf.kohya_lora(lf.random_factors(mods, rank=rank, seed=70 + i))
        sd = {k: v.to(dtype) if k.endswith(".weight") else v for k, v in sd.items()}
        out[write(loras_dir, f"dtypes_{i}.safetensors", sd)] = sd
    return out


def _stacks(models, files, strengths):
    """(ours, core): Apply LoRA Stack, and core's loader chained once per file, MODEL and CLIP."""
    entries = [(name, s, s) for name, s in zip(files, strengths, strict=True)]
    ours = ApplyLoraStack().execute(models.model, entries, clip=models.clip)["result"][:2]
    m, c = models.model, models.clip
    for name, s, _ in entries:
        m, c = comfy.sd.load_lora_for_models(m, c, files[name], s, s)
    return ours, (m, c)


def _exact(core_patches, key: str, base: torch.Tensor) -> torch.Tensor:
    """Core's own adapters on ``base``, all in float64: the reference both sides are held to."""
    return comfy.lora.calculate_weight(
        core_patches[key], base.double(), key, intermediate_dtype=torch.float64
    )


class Errors:
    """Absolute errors against the float64 reference, summed and at worst, over many weights."""

    def __init__(self):
        self.total, self.worst, self.count = 0.0, 0.0, 0

    def add(self, got: torch.Tensor, exact: torch.Tensor) -> None:
        err = (got.double() - exact).abs()
        self.total += err.sum().item()
        self.worst = max(self.worst, err.max().item())
        self.count += err.numel()

    @property
    def mean(self) -> float:
        return self.total / self.count


def _assert_close_to_core(got, theirs, exact, dtype, key: str) -> None:
    """Both round the same exact values: apart by at most two steps of ``dtype`` at the weight's scale."""
    scale = exact.abs().amax().item()
    assert (got.double() - theirs.double()).abs().max().item() <= 2 * torch.finfo(dtype).eps * scale, key


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("strengths", sorted(STRENGTHS))
def test_lowvram_patch_on_half_weights(sd15, files, dtype, strengths, monkeypatch):
    """LowVramPatch on a bf16 / fp16 weight (as the layer casts it each forward): ours is at least as
    accurate as core's chained adapters against float64, within two steps of the dtype of core's
    result, in the weight's dtype, and really computed in that dtype (no float32 copy reached it)."""
    (ours, ours_clip), (core, core_clip) = _stacks(sd15, files, STRENGTHS[strengths])
    seen = _spy_dtypes(monkeypatch)
    ours_err, core_err = Errors(), Errors()
    for o, c, model in ((ours, core, sd15.model), (ours_clip.patcher, core_clip.patcher, sd15.clip.patcher)):
        sd = model.model.state_dict()
        assert set(o.patches) == set(c.patches) and o.patches
        for key in o.patches:
            base = sd[key].to(dtype)
            got = comfy.model_patcher.LowVramPatch(key, o.patches)(base.clone())
            theirs = comfy.model_patcher.LowVramPatch(key, c.patches)(base.clone())
            exact = _exact(c.patches, key, base)
            assert got.dtype == dtype and got.shape == base.shape, key
            assert (exact - base.double()).abs().max() > 50 * torch.finfo(dtype).eps, (
                f"{key}: LoRA changed nothing"
            )
            _assert_close_to_core(got, theirs, exact, dtype, key)
            ours_err.add(got, exact)
            core_err.add(theirs, exact)
    assert seen == {dtype}
    assert ours_err.mean <= core_err.mean, (ours_err.mean, core_err.mean)
    assert ours_err.worst <= core_err.worst, (ours_err.worst, core_err.worst)


def _spy_dtypes(monkeypatch) -> set:
    """The dtypes of the weights FoundryPatch.calculate_weight receives from here on."""
    seen = set()
    original = comfy_bridge.FoundryPatch.calculate_weight

    def spy(self, weight, *args, **kwargs):
        seen.add(weight.dtype)
        return original(self, weight, *args, **kwargs)

    monkeypatch.setattr(comfy_bridge.FoundryPatch, "calculate_weight", spy)
    return seen


def _one_key_per_shape(patches, sd) -> list[str]:
    """A patched key for each distinct weight shape (the profiler is slow; shapes decide the blocks)."""
    by_shape = {}
    for key in patches:
        by_shape.setdefault(tuple(sd[key].shape), key)
    return sorted(by_shape.values())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("caller", ["LowVramPatch", "patch_weight_to_device"])
def test_patch_temporaries_stay_under_one_weight(sd15, files, dtype, caller):
    """Peak memory PyTorch's allocator hands out during one patch call (scripts/alloc_peak.py), as
    LowVramPatch calls it (math in the weight's dtype) and as 0.8+'s patch_weight_to_device does
    (intermediate float32): ours at most the weight's own size in its dtype, on a UNet weight of
    each shape; core's chained adapters need more than that (a dense change per LoRA), which
    shows the measure sees them."""
    ours, core = (side[0] for side in _stacks(sd15, files, STRENGTHS["own"]))
    sd = sd15.model.model.state_dict()
    intermediate = dtype if caller == "LowVramPatch" else torch.float32
    keys = _one_key_per_shape(ours.patches, sd)
    over = []
    for key in keys:
        size = sd[key].numel() * torch.finfo(dtype).bits // 8
        peaks = []
        for patcher in (ours, core):

            def call(weight, patches=patcher.patches, key=key):
                return comfy.lora.calculate_weight(patches[key], weight, key, intermediate_dtype=intermediate)

            call(sd[key].to(dtype))  # warm-up: the first call also builds per-patch constants
            weight = sd[key].to(dtype)  # the working copy, made before the patch runs
            peak, out = peak_bytes(lambda w=weight: call(w))
            assert out.data_ptr() == weight.data_ptr(), f"{key}: not patched in place"
            peaks.append(peak)
        assert peaks[0] <= size, f"{key}: ours allocated {peaks[0]} bytes for a {size}-byte weight"
        over.append(peaks[1] > size)
    assert len(keys) >= 5 and sum(over) > len(over) // 2, (
        "core's temporaries were not seen: the measure is moot"
    )


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_load_in_a_forced_lora_compute_dtype(sd15, files, dtype, monkeypatch):
    """0.8+: ModelPatcher builds each weight's working copy in lora_compute_dtype(device) (float16 on
    most CUDA GPUs). Forced to fp16 / bf16 for the CPU, the full load hands FoundryPatch weights in that
    dtype; ours is at least as accurate as core's chain against float64, and within two steps of it."""
    mm = comfy.model_management
    if not hasattr(mm, "lora_compute_dtype"):
        pytest.skip("this ComfyUI (before 0.8) patches in float32 only: no lora_compute_dtype")
    (ours, ours_clip), (core, _) = _stacks(sd15, files, STRENGTHS["own"])
    mm.unload_all_models()
    device = ours.load_device
    monkeypatch.setitem(mm.LORA_COMPUTE_DTYPES, device, dtype)
    seen = _spy_dtypes(monkeypatch)
    loaded = {}
    for side, patcher in (("ours", ours), ("core", core)):
        patcher.patch_model(device_to=device)
        loaded[side] = {k: comfy.utils.get_attr(patcher.model, k).detach().clone() for k in patcher.patches}
        patcher.unpatch_model()
    assert seen == {dtype}
    sd = sd15.model.model.state_dict()
    ours_err, core_err = Errors(), Errors()
    for key, got in loaded["ours"].items():
        exact = _exact(core.patches, key, sd[key].to(dtype))  # both start from the same rounded copy
        assert got.dtype == sd[key].dtype, key  # rounded back into the model's own dtype
        _assert_close_to_core(got, loaded["core"][key], exact, dtype, key)
        ours_err.add(got, exact)
        core_err.add(loaded["core"][key], exact)
    assert ours_err.mean <= core_err.mean and ours_err.worst <= core_err.worst, (
        ours_err.worst,
        core_err.worst,
    )


@pytest.fixture(scope="module")
def half_models(request):
    """Tiny SD1.5 whose UNet weights are stored in each half dtype (built apart: sd15 stays float32)."""
    import model_factory

    out = {}
    for dtype in HALF:
        models = model_factory.build("sd15")
        models.model.model.diffusion_model.to(dtype)
        out[dtype] = models
    return out


def _record_lowvram_calls(monkeypatch) -> dict:
    """key -> (the weight LowVramPatch received, what it returned), for the calls from here on."""
    calls = {}
    original = comfy.model_patcher.LowVramPatch.__call__

    def recording(self, weight):
        before = weight.clone()
        out = original(self, weight)
        calls[self.key] = (before, out.clone())
        return out

    monkeypatch.setattr(comfy.model_patcher.LowVramPatch, "__call__", recording)
    return calls


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_partial_load_forward_in_half_precision(half_models, files, dtype, monkeypatch):
    """A partial (low-VRAM) load of a bf16 / fp16 UNet run in its dtype: every patched layer calls
    LowVramPatch at the forward with the weight cast to that dtype. Each weight ours computed is at
    least as accurate against float64 as core's chain (same input), and the UNet's output is core's
    within the noise of that dtype, far from the output without LoRAs."""
    models = half_models[dtype]
    (ours, _), (core, _) = _stacks(models, files, SMALL)
    g = torch.Generator().manual_seed(4)
    x, t, ctx = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 77, 64, generator=g),
    )
    comfy.model_management.unload_all_models()
    seen = _spy_dtypes(monkeypatch)

    def forward(patcher):
        calls = _record_lowvram_calls(monkeypatch)
        patcher.patch_model(lowvram_model_memory=1)  # 1 byte: every layer patched on the fly
        with torch.no_grad():
            out = patcher.model.diffusion_model(x.to(dtype), t, context=ctx.to(dtype)).float()
        patcher.unpatch_model()
        return out, calls

    (got, ours_calls), (theirs, core_calls) = forward(ours), forward(core)
    plain, _ = forward(models.model)
    assert seen == {dtype} and set(ours_calls) == set(core_calls) == set(ours.patches), "not all on the fly"
    ours_err, core_err = Errors(), Errors()
    for key, (before, out) in ours_calls.items():
        assert before.dtype == dtype and torch.equal(before, core_calls[key][0]), key
        exact = _exact(core.patches, key, before)
        ours_err.add(out, exact)
        core_err.add(core_calls[key][1], exact)
    assert ours_err.mean <= core_err.mean and ours_err.worst <= core_err.worst, (
        ours_err.worst,
        core_err.worst,
    )
    # The stack moves the output by about 1; half-precision activations alone move it by about 0.05.
    lora_effect = (theirs - plain).abs().max().item()
    assert (got - theirs).abs().max().item() <= 0.15 * lora_effect, (got - theirs).abs().max().item()
