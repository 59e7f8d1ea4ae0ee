"""lora_core.train.targets (Targets from a key map, by naming style), lora_core.train.existing (a run
folder's files before a run) and the Literal-typed option names of TrainConfig."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from torch import nn

from lora_foundry.lora_core.train import existing as ex
from lora_foundry.lora_core.train.loss import LOSSES
from lora_foundry.lora_core.train.optim import OPTIMIZERS
from lora_foundry.lora_core.train.schedule import SCHEDULERS
from lora_foundry.lora_core.train.state import CheckpointPlan
from lora_foundry.lora_core.train.targets import targets_from_key_map
from lora_foundry.lora_core.train.trainer import PRECISIONS, TrainConfig


def toy_unet() -> nn.Module:
    root = nn.Module()
    root.diffusion_model = nn.Module()
    root.diffusion_model.input_blocks = nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 4)])
    return root


# Two names per weight, as ComfyUI's map holds for SDXL: diffusers-style and SGM-style; plus a
# name for a slice of a fused weight (a tuple) and one for a weight the model lacks.
KEY_MAP = {
    "lora_unet_down_blocks_0_a": "diffusion_model.input_blocks.0.weight",
    "lora_unet_input_blocks_0": "diffusion_model.input_blocks.0.weight",
    "lora_unet_down_blocks_0_b": "diffusion_model.input_blocks.1.weight",
    "lora_unet_input_blocks_1": "diffusion_model.input_blocks.1.weight",
    "lora_unet_fused_q": ("diffusion_model.input_blocks.1.weight", (0, 0, 1)),
    "lora_unet_missing": "diffusion_model.output_blocks.0.weight",
    "transformer.x": "diffusion_model.input_blocks.0.weight",
}


@pytest.mark.parametrize(
    ("style", "names"),
    [
        ("kohya", {"lora_unet_down_blocks_0_a", "lora_unet_down_blocks_0_b"}),
        ("kohya_sgm", {"lora_unet_input_blocks_0", "lora_unet_input_blocks_1"}),
    ],
)
def test_targets_named_by_style_for_present_whole_weights(style, names):
    root = toy_unet()
    targets = targets_from_key_map(KEY_MAP, root, style)
    assert {t.name for t in targets} == names
    by_path = {t.path: t for t in targets}
    assert set(by_path) == {"diffusion_model.input_blocks.0", "diffusion_model.input_blocks.1"}
    assert by_path["diffusion_model.input_blocks.1"].module is root.diffusion_model.input_blocks[1]


def test_unknown_naming_style_is_named():
    with pytest.raises(ValueError, match=r"naming style should be one of kohya, kohya_sgm, got 'peft'"):
        targets_from_key_map(KEY_MAP, toy_unet(), "peft")


def write_run(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        f"{name}.safetensors",
        f"{name}.trainstate",
        f"{name}.trainstate.json",
        f"{name}-step000002.safetensors",
    ]
    for f in files:
        (folder / f).write_bytes(b"x")
    return files


def test_overwrite_deletes_only_this_runs_files(tmp_path):
    mine = write_run(tmp_path, "run")
    other = write_run(tmp_path, "other")
    (tmp_path / "notes.txt").write_text("keep")
    plan = CheckpointPlan(tmp_path, "run")
    assert [p.name for p in ex.run_files(plan)] == sorted(mine)
    ex.handle_existing(plan, "resume")
    assert all((tmp_path / f).exists() for f in mine)
    ex.handle_existing(plan, "overwrite")
    assert not any((tmp_path / f).exists() for f in mine)
    assert all((tmp_path / f).exists() for f in other) and (tmp_path / "notes.txt").exists()


def test_error_names_the_folder_and_the_fix(tmp_path):
    write_run(tmp_path, "run")
    with pytest.raises(
        ValueError, match=r"already has 4 files of a run named 'run'.*'resume' or 'overwrite'"
    ):
        ex.handle_existing(CheckpointPlan(tmp_path, "run"), "error")
    with pytest.raises(ValueError, match=r"`existing` should be one of resume, overwrite, error, got 'keep'"):
        ex.handle_existing(CheckpointPlan(tmp_path, "run"), "keep")
    ex.handle_existing(CheckpointPlan(tmp_path / "absent", "run"), "error")  # nothing there: no error


def test_config_option_names_are_literal_types_matching_the_accepted_values():
    hints = typing.get_type_hints(TrainConfig)
    expected = {
        "optimizer": OPTIMIZERS,
        "scheduler": SCHEDULERS,
        "loss": LOSSES,
        "precision": tuple(PRECISIONS),
    }
    for name, allowed in expected.items():
        assert typing.get_origin(hints[name]) is typing.Literal, name
        assert typing.get_args(hints[name]) == allowed, name
        field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        assert field.default in allowed
        with pytest.raises(ValueError, match=rf"`{name}` should be one of"):
            TrainConfig(**{name: "nope"})
    assert torch.float32 in PRECISIONS.values()
