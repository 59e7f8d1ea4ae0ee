"""A training state records how many ranks trained it: resuming it with another number of ranks
(1 -> 2, 2 -> 1, 2 -> 3) is refused with a settings error that says why and what to do, not taken
for damage; the same number resumes."""

import pytest
from unit.test_train_trainer import make_trainer
from unit.train_helpers import one_thread  # noqa: F401

from lora_foundry.lora_core.train.parallel import DataParallelTrainer, World
from lora_foundry.lora_core.train.state import DamagedStateError
from lora_foundry.lora_core.train.trainer import TrainConfig

CFG = TrainConfig(steps=2, batch_size=2, lr=1e-3, seed=2)


def trainer_of(ranks: int):
    plain, _ = make_trainer(CFG)
    if ranks == 1:
        return plain
    net = plain.networks["unet"]
    return DataParallelTrainer(CFG, plain.data, plain.predict, plain.schedule, net, world=World(0, ranks))


@pytest.mark.parametrize(("saved", "now"), [(1, 2), (2, 1), (2, 3)])
def test_another_number_of_ranks_is_refused_saying_why_and_what_to_do(saved, now):
    tensors, info = trainer_of(saved).state()
    assert info.get("world_size", 1) == saved
    with pytest.raises(ValueError) as e:
        trainer_of(now).load_state(tensors, info, source="run-step000002")
    message = str(e.value)
    assert not isinstance(e.value, DamagedStateError)
    assert f"run-step000002 was saved by a run of {saved} rank(s), this run has {now}" in message
    assert "would change the global batch" in message and f"Resume with {saved} rank(s)" in message
    assert "'overwrite'" in message


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_same_number_of_ranks_resumes(ranks):
    tensors, info = trainer_of(ranks).state()
    trainer_of(ranks).load_state(tensors, info)
