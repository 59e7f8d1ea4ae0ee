"""Training job files (lora_core.train.job): the schema follows the trainer's dataclasses, a job
survives a write and read unchanged, and every kind of bad value is refused naming its field."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields

import pytest

from lora_foundry.lora_core.train.dataset import DatasetOptions
from lora_foundry.lora_core.train.job import (
    MAX_BYTES,
    SCHEMA,
    JobError,
    job_from_dict,
    parse_job,
    read_job,
)
from lora_foundry.lora_core.train.trainer import TrainConfig


def minimal() -> dict:
    return {"schema": SCHEMA, "version": 1, "model": {"checkpoint": "sd15.safetensors"}, "dataset_source": {}}


def test_round_trip_keeps_every_value(tmp_path):
    doc = minimal()
    doc["train"] = {"steps": 7, "lr": 3e-4, "optimizer": "Lion", "precision": "bf16", "seed": 5}
    doc["dataset"] = {"resolution": 256, "trigger_word": "zkw ünï", "flip": True}
    doc["network"] = {"rank": 8, "alpha": 4, "targets": "attention_ff"}
    job = job_from_dict(doc)
    path = tmp_path / "j.json"
    path.write_text(job.to_json(), encoding="utf-8")
    again = read_job(path)
    assert again == job
    assert (
        again.train.optimizer == "Lion" and again.train.steps == 7 and again.dataset.trigger_word == "zkw ünï"
    )
    assert isinstance(again.network.alpha, float) and again.network.alpha == 4.0


def test_every_trainconfig_and_dataset_field_is_in_the_file():
    written = json.loads(job_from_dict(minimal()).to_json())
    assert set(written["train"]) == {f.name for f in fields(TrainConfig)}
    assert set(written["dataset"]) == {f.name for f in fields(DatasetOptions)}
    assert written["train"] == asdict(TrainConfig())  # absent fields take the trainer's defaults


def test_key_names_default_to_kohya_and_take_diffusers():
    assert job_from_dict(minimal()).output.key_names == "kohya"  # a job written before the option
    doc = minimal()
    doc["output"] = {"key_names": "diffusers"}
    job = job_from_dict(doc)
    assert job.output.key_names == "diffusers"
    assert json.loads(job.to_json())["output"]["key_names"] == "diffusers"


def test_literal_choices_come_from_the_trainer():
    hints = typing.get_type_hints(TrainConfig)
    for choice in typing.get_args(hints["scheduler"]):
        doc = minimal()
        doc["train"] = {"scheduler": choice}
        assert job_from_dict(doc).train.scheduler == choice


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "optimizer", "SGD9", r"`train\.optimizer` should be one of 'AdamW'"),
        ("train", "steps", "10", r"`train\.steps` should be a whole number, got \"10\""),
        ("train", "steps", 2.5, r"`train\.steps` should be a whole number"),
        ("train", "steps", True, r"`train\.steps` should be a whole number, got true"),
        ("train", "lr", -1.0, r"in `train`: `lr` should be positive"),
        ("train", "warp_speed", 9, r"`train\.warp_speed` is not a setting"),
        ("network", "rank", 0, r"in `network`: `rank` should be 1 to 1024"),
        ("network", "targets", "everything", r"`network\.targets` should be one of 'attention'"),
        ("dataset", "crop", "left", r"in `dataset`: `crop` should be one of center, random"),
        ("dataset", "flip", "yes", r"`dataset\.flip` should be true or false"),
        ("output", "existing", "clobber", r"`output\.existing` should be one of 'resume'"),
        ("output", "key_names", "peft", r"`output\.key_names` should be one of 'kohya', 'diffusers'"),
        ("model", "checkpoint", "", r"in `model`: `checkpoint` is empty"),
        ("model", "folder", "loras", r"`model\.folder` should be one of 'checkpoints'"),
    ],
)
def test_bad_values_are_named(section, key, value, message):
    doc = minimal()
    doc.setdefault(section, {})[key] = value
    with pytest.raises(JobError, match=message):
        job_from_dict(doc)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "one JSON object"),
        ('{"schema": "x"}', "`schema` should be 'lora_foundry.train_job'"),
        (json.dumps({**minimal(), "version": 99}), "`version` 99 is not one this pack reads"),
        (json.dumps({**minimal(), "extra": {}}), "`extra` is not a section"),
        (json.dumps({**minimal(), "train": []}), "`train` should be an object"),
        (json.dumps({**minimal(), "train": {"lr": 1}}).replace(": 1}", ": NaN}"), "NaN"),
        ('{"schema": ', "not valid JSON"),
        (json.dumps({"schema": SCHEMA, "version": 1}), "`model` is missing"),
    ],
)
def test_bad_documents_are_named(text, message):
    with pytest.raises(JobError, match=message):
        parse_job(text)


def test_oversized_file_refused_by_name(tmp_path):
    path = tmp_path / "huge.json"
    path.write_bytes(b" " * (MAX_BYTES + 1))
    with pytest.raises(JobError, match=r"huge\.json: the job file is .* bytes, over"):
        read_job(path)


def test_missing_file_is_a_job_error(tmp_path):
    with pytest.raises(JobError, match="cannot read the job file"):
        read_job(tmp_path / "nope.json")
