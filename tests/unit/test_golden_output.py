"""File output stays byte-identical across the lora_core restructure (issue #18): a merged file and a
trained file are written from fixed seeds and compared with golden files the code wrote before it.

The golden files in tests/data/golden/ were written by running this module as a script
(`python tests/unit/test_golden_output.py`) on the code before the restructure; the commit that
added them comes before every refactor commit. Only the run's time stamps are masked, and the header
is compared as JSON: safetensors writes the metadata map in an order that changes from one process
to the next (a Rust hash map), so even the old code does not repeat its header bytes; the tensor
bytes and every header entry must match exactly, except the tensors of the merges that go through
QR / SVD (LAPACK), which match within a few float32 steps (LAPACK_MERGES).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

if __name__ == "__main__":  # run as a script: make `lora_foundry` and the helpers importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
    import conftest  # noqa: F401

from unit.train_helpers import batches, latent_dataset, predictor, schedule, targets  # noqa: E402

from lora_foundry.lora_core.apply import loader  # noqa: E402
from lora_foundry.lora_core.files.detect import FamilyGuess  # noqa: E402
from lora_foundry.lora_core.merge.bake import bake_stack  # noqa: E402
from lora_foundry.lora_core.merge.merge import MergeSpec  # noqa: E402
from lora_foundry.lora_core.train.network import LoraNetwork, select_targets  # noqa: E402
from lora_foundry.lora_core.train.run import RunInfo, fit  # noqa: E402
from lora_foundry.lora_core.train.state import CheckpointPlan  # noqa: E402
from lora_foundry.lora_core.train.trainer import TrainConfig, Trainer  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
SHAPES = {"w.lin.weight": (12, 10), "w.conv.weight": (8, 6, 3, 3), "w.point.weight": (8, 6, 1, 1)}
NAMES = {key: "lora_unet_" + key.split(".")[1] for key in SHAPES}
MERGES = {  # file stem -> the merge it records
    "merged_concat": MergeSpec("concat"),
    "merged_svd": MergeSpec("svd", rank=3, conv_rank=2),
    "merged_dare_ties": MergeSpec("dare_ties", rank=4, density=0.6, seed=11),
}
# Keys whose value is the clock at the time of the run.
TIME_KEYS = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date")


def _kohya_lora(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in SHAPES.items():
        name, rank = NAMES[key], 3
        kernel = shape[2:]
        out[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *([1] * len(kernel)), generator=g)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def _loha(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    name, (n_out, n_in) = NAMES["w.lin.weight"], SHAPES["w.lin.weight"]
    parts = {"hada_w1_a": (n_out, 2), "hada_w1_b": (2, n_in), "hada_w2_a": (n_out, 2), "hada_w2_b": (2, n_in)}
    out = {f"{name}.{part}": torch.randn(*shape, generator=g) for part, shape in parts.items()}
    out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def write_merged(folder: Path) -> list[Path]:
    """Two LoRA files (kohya LoRA with conv modules, LyCORIS LoHa) baked with three methods."""
    meta = {"ss_tag_frequency": json.dumps({"set": {"cat": 3, "dog": 1}})}
    safetensors.torch.save_file(_kohya_lora(1), str(folder / "a.safetensors"), metadata=meta)
    safetensors.torch.save_file(_loha(2), str(folder / "b.safetensors"))
    key_maps = {"unet": {name: key for key, name in NAMES.items()}}
    loader.CACHE._items.clear()
    loras, plans = [], []
    for stem, strength in (("a", 0.8), ("b", -0.5)):
        lora = loader.load_lora(str(folder / f"{stem}.safetensors"))
        plan = loader.plan_lora(lora, key_maps, {"unet": strength}, FamilyGuess("SD1.x", "test"), "",
                                {"unet": SHAPES})  # fmt: skip
        loras.append(lora)
        plans.append(plan)
    written = []
    for stem, spec in MERGES.items():
        # concat takes only the plain LoRA: LoHa is a dense term it refuses.
        count = 1 if spec.method == "concat" else 2
        result = bake_stack(loras[:count], plans[:count], {"unet": NAMES}, {"unet": SHAPES}, str(folder),
                            stem, spec, "SD1.x", dtype="fp32")  # fmt: skip
        written.append(Path(result.path))
    return written


def write_trained(folder: Path) -> Path:
    """A short seeded run of the trainer on the tiny pure-torch denoiser (one thread: same sums)."""
    from unit.train_helpers import TinyUNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(steps=5, batch_size=2, lr=5e-3, seed=3)
        model = TinyUNet()
        model.requires_grad_(False)
        net = LoraNetwork(select_targets(targets(model), "attention"), rank=4, alpha=2, seed=cfg.seed)
        net.attach()
        trainer = Trainer(cfg, batches(latent_dataset(), cfg.batch_size), predictor(model), schedule(), net)
        plan = CheckpointPlan(folder=folder, name="trained", dtype="fp16")
        info = RunInfo(
            base_model="tiny.safetensors", num_images=6, modelspec_architecture="stable-diffusion-v1/lora"
        )
        return fit(trainer, plan, info).path
    finally:
        torch.set_num_threads(threads)


def masked(path: Path) -> tuple[dict, bytes]:
    """The header (time stamps replaced by a marker) and the tensor bytes of a safetensors file."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__", {})
    for key in TIME_KEYS:
        if key in meta:
            meta[key] = "<time>"
    return header, data[8 + size :]


# Merges whose factors come from a QR / SVD: LAPACK's result differs in the last bits from one CPU to
# another (the same torch gave differences of at most 2e-6 on values near 2-3 on an AMD EPYC against
# the CPU that wrote the golden files), so their tensors are compared within a few float32 steps.
LAPACK_MERGES = ("merged_svd", "merged_dare_ties")


@pytest.mark.timeout(120)
def test_merged_files_are_byte_identical_to_the_golden_ones(tmp_path):
    written = write_merged(tmp_path)
    assert [p.name for p in written] == [f"{stem}.safetensors" for stem in MERGES]
    for path in written:
        header, tensors = masked(path)
        golden_header, golden_tensors = masked(GOLDEN / path.name)
        assert header == golden_header, path.name
        if path.stem not in LAPACK_MERGES:
            assert tensors == golden_tensors, path.name
            continue
        ours, golden = (
            safetensors.torch.load_file(str(path)),
            safetensors.torch.load_file(str(GOLDEN / path.name)),
        )
        for key, value in golden.items():  # same keys, shapes and dtypes: the header said so
            scale = max(1.0, float(value.abs().max()))
            assert torch.allclose(ours[key], value, rtol=0, atol=1e-5 * scale), (path.name, key)


@pytest.mark.timeout(180)
def test_trained_file_is_identical_to_the_golden_one_but_for_time_stamps(tmp_path):
    path = write_trained(tmp_path)
    header, tensors = masked(path)
    golden_header, golden_tensors = masked(GOLDEN / "trained.safetensors")
    assert header == golden_header
    assert tensors == golden_tensors
    # The run did write time stamps: the mask hid real values, not missing ones.
    raw = safetensors.safe_open(str(path), "pt").metadata()
    assert float(raw["ss_training_finished_at"]) >= float(raw["ss_training_started_at"]) > 0


def test_the_mask_hides_only_time_stamps(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"ss_training_started_at": "1.0", "ss_seed": "3"}
    safetensors.torch.save_file({"x": torch.ones(2)}, str(path), metadata=meta)
    header, _ = masked(path)
    assert header["__metadata__"] == {"ss_training_started_at": "<time>", "ss_seed": "3"}


if __name__ == "__main__":
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for written in [*write_merged(GOLDEN), write_trained(GOLDEN)]:
        print(written.name, written.stat().st_size)
    for stem in ("a", "b"):  # the inputs are rebuilt by the test from their seeds
        (GOLDEN / f"{stem}.safetensors").unlink()
