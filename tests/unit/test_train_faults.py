"""Faults in a training run: a damaged newest state is named and the one before it resumed (with a
note), a run whose every state is damaged stops naming the file, and a cancel is honoured inside
gradient accumulation, leaving the trainer as it was before the step and a checkpoint saved."""

import json

import pytest
import torch
from unit.test_train_trainer import make_trainer, weights
from unit.train_helpers import one_thread  # noqa: F401

from lora_foundry.lora_core.train.run import RunInfo, fit
from lora_foundry.lora_core.train.state import CheckpointPlan, DamagedStateError, read_state
from lora_foundry.lora_core.train.trainer import TrainConfig

CFG = dict(steps=6, batch_size=2, lr=5e-3, seed=4)


def plan(tmp_path, every=2):
    return CheckpointPlan(folder=tmp_path / "run", name="run", every=every, keep_last=0, dtype="fp32")


def stopped_at_4(tmp_path):
    """A run stopped after step 4 with states at steps 2 and 4; returns the plan."""
    trainer, _ = make_trainer(TrainConfig(**CFG))
    fit(trainer, plan(tmp_path), RunInfo(), stop_after=4)
    return plan(tmp_path)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def reference_from_step_2(tmp_path):
    """The weights a run resumed from the step-2 state reaches: computed by resuming a copy of
    the run folder that holds only that state."""
    src = plan(tmp_path)
    ref = CheckpointPlan(tmp_path / "ref", "run", every=2, keep_last=0, dtype="fp32")
    ref.folder.mkdir()
    for suffix in (".trainstate", ".trainstate.json"):
        name = f"run-step000002{suffix}"
        (ref.folder / name).write_bytes((src.folder / name).read_bytes())
    trainer, _ = make_trainer(TrainConfig(**CFG))
    fit(trainer, ref, RunInfo())
    return weights(trainer)


DAMAGE = {
    "truncated tensors": ("run-step000004.trainstate", truncate),
    "empty tensors": ("run-step000004.trainstate", lambda p: p.write_bytes(b"")),
    "broken json": ("run-step000004.trainstate.json", lambda p: p.write_text('{"step": 4, "epo')),
    "json without optimizer": (
        "run-step000004.trainstate.json",
        lambda p: p.write_text(
            json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "optimizer"})
        ),
    ),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_state_falls_back_to_the_previous_one(tmp_path, kind):
    p = stopped_at_4(tmp_path)
    name, damage = DAMAGE[kind]
    damage(p.folder / name)
    with pytest.raises(DamagedStateError, match=f"training state {name}.*is damaged"):
        read_state(p.folder / "run-step000004.trainstate.json")
    expected = reference_from_step_2(tmp_path)

    trainer, _ = make_trainer(TrainConfig(**CFG))
    result = fit(trainer, p, RunInfo())

    assert result.resumed_from == 2 and result.step == 6
    assert len(result.notes) == 1
    note = result.notes[0]
    assert (
        name in note and "damaged" in note and "resumed from run-step000002.trainstate.json (step 2)" in note
    )
    for k, v in expected.items():
        assert torch.equal(weights(trainer)[k], v), k


def test_all_states_damaged_is_an_error_naming_the_newest(tmp_path):
    p = stopped_at_4(tmp_path)
    truncate(p.folder / "run-step000004.trainstate")
    truncate(p.folder / "run-step000002.trainstate")
    trainer, _ = make_trainer(TrainConfig(**CFG))
    with pytest.raises(
        DamagedStateError, match=r"run-step000004.trainstate .*damaged.*'overwrite' to start over"
    ):
        fit(trainer, p, RunInfo())


def test_changed_rank_is_a_settings_error_not_damage(tmp_path):
    p = stopped_at_4(tmp_path)
    cfg = TrainConfig(**CFG)
    trainer, model = make_trainer(cfg)
    from unit.train_helpers import targets

    from lora_foundry.lora_core.train.network import LoraNetwork, select_targets
    from lora_foundry.lora_core.train.trainer import Trainer

    net = LoraNetwork(select_targets(targets(model), "attention"), rank=2, alpha=2, seed=cfg.seed)
    other = Trainer(cfg, trainer.data, trainer.predict, trainer.schedule, net)
    with pytest.raises(ValueError, match=r"shape .*another rank") as e:
        fit(other, p, RunInfo())
    assert not isinstance(e.value, DamagedStateError)


class Cancel(Exception):
    pass


def counting_predict(trainer):
    calls = {"n": 0}
    inner = trainer.predict

    def predict(x, t, cond):
        calls["n"] += 1
        return inner(x, t, cond)

    trainer.predict = predict
    return calls


def test_cancel_is_honoured_between_micro_steps_and_the_step_is_undone(tmp_path):
    cfg = TrainConfig(steps=5, batch_size=1, grad_accum=8, seed=2)
    trainer, _ = make_trainer(cfg)
    calls = counting_predict(trainer)
    state = {"stop": False}

    def check():
        if state["stop"]:
            raise Cancel()

    trainer._check = check
    trainer.train_step()
    assert calls["n"] == 8
    before = weights(trainer)
    position = (trainer.epoch, trainer.position)

    inner = trainer.predict

    def predict(x, t, cond):
        if calls["n"] == 10:  # cancel pressed during call 11, the third micro-step of step 2
            state["stop"] = True
        return inner(x, t, cond)

    trainer.predict = predict
    with pytest.raises(Cancel):
        trainer.train_step()
    assert calls["n"] == 11, "micro-steps ran after the cancel"
    assert trainer.step == 1 and (trainer.epoch, trainer.position) == position
    assert all(torch.equal(weights(trainer)[k], v) for k, v in before.items())
    assert all(p.grad is None for p in trainer.params)


def test_cancel_inside_accumulation_saves_the_last_completed_step(tmp_path):
    cfg = TrainConfig(steps=5, batch_size=1, grad_accum=16, seed=2)
    trainer, _ = make_trainer(cfg)
    calls = counting_predict(trainer)

    def check():
        if calls["n"] >= 16 + 3:  # cancel pressed during the third micro-step of step 2
            raise Cancel()

    trainer._check = check
    p = plan(tmp_path, every=0)
    with pytest.raises(Cancel):
        fit(trainer, p, RunInfo())
    assert calls["n"] == 16 + 3 and trainer.step == 1
    assert json.loads((p.folder / "run-step000001.trainstate.json").read_text())["step"] == 1
