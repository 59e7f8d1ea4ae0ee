"""Train LoRA gives the memory its run freed back to the system once the run's objects are gone,
after a finished run and after a refused one (lora_core.train.heap.release_freed_memory)."""

from __future__ import annotations

import gc

import model_factory
import pytest
from flow_data import flux_dataset
from train_run import train_model

from lora_foundry.lora_core.train.network import LoraNetwork
from lora_foundry.lora_core.train.trainer import Trainer
from lora_foundry.nodes import train as train_node

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def releases(monkeypatch):
    """Each release's count of Trainer and LoraNetwork objects still alive when it ran."""
    seen: list[int] = []

    def record() -> bool:
        gc.collect()
        seen.append(sum(issubclass(type(o), (Trainer, LoraNetwork)) for o in gc.get_objects()))
        return True

    monkeypatch.setattr(train_node, "release_freed_memory", record)
    return seen


def _train(patcher, **changes):
    return train_model(patcher, flux_dataset(2), **changes)


@pytest.mark.timeout(300)
def test_released_after_a_run_with_nothing_of_it_left(loras_dir, releases):
    out = _train(model_factory.flux_model(seed=0), output_name="heap_run", steps=2)
    assert (loras_dir / out["result"][2]).is_file()
    assert releases == [0]


@pytest.mark.timeout(300)
def test_released_after_a_refused_run(loras_dir, releases):
    with pytest.raises(RuntimeError, match=r"\[Train LoRA\] `clip` is needed"):
        _train(model_factory.flux_model(seed=0), output_name="heap_refused", steps=1, te_lr=1e-4)
    assert releases == [0]
    assert not list(loras_dir.glob("heap_refused*"))
