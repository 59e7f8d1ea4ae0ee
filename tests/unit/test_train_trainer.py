"""The training loop on a pure-torch tiny denoiser: it learns (evaluation loss, planted low-rank
teacher), exact resume, stop-and-save on errors, NaN stop, and the plumbing of each option."""

import json

import pytest
import safetensors.torch
import torch
from unit.train_helpers import (
    CTX,
    TOKENS,
    FixedData,
    TinyUNet,
    batches,
    latent_dataset,
    one_thread,  # noqa: F401
    predictor,
    schedule,
    targets,
)

from lora_foundry.lora_core.train.loss import per_sample_loss
from lora_foundry.lora_core.train.network import LoraNetwork, Target, select_targets
from lora_foundry.lora_core.train.run import RunInfo, fit
from lora_foundry.lora_core.train.state import CheckpointPlan
from lora_foundry.lora_core.train.trainer import NonFiniteLossError, TrainConfig, Trainer


def make_trainer(cfg: TrainConfig, data=None, model=None, dora=False, preset="attention", predict=None):
    model = model or TinyUNet()
    model.requires_grad_(False)
    net = LoraNetwork(select_targets(targets(model), preset), rank=4, alpha=4, dora=dora, seed=cfg.seed)
    net.attach()
    data = data or batches(latent_dataset(), cfg.batch_size)
    return Trainer(cfg, data, predict or predictor(model), schedule(), net), model


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.networks["unet"].named_weights().items()}


def eval_loss(model, sched, latents, contexts, noise, timesteps):
    with torch.no_grad():
        noisy = sched.add_noise(latents, noise, timesteps)
        return per_sample_loss(model(noisy, timesteps, contexts), noise).mean().item()


def test_loss_on_fixed_eval_set_falls():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 4, 4, 4, generator=g)
    contexts = torch.randn(4, TOKENS, CTX, generator=g)
    data = FixedData(latents, contexts, batch_size=4)
    cfg = TrainConfig(steps=400, lr=5e-3, batch_size=4, seed=1)
    trainer, model = make_trainer(cfg, data=data, preset="all_linear_conv")
    sched = trainer.schedule
    noise = torch.randn(4 * 8, 4, 4, 4, generator=g)
    ts = torch.randint(0, 1000, (32,), generator=g)
    evals = (latents.repeat(8, 1, 1, 1), contexts.repeat(8, 1, 1), noise, ts)
    before = eval_loss(model, sched, *evals)
    for _ in range(cfg.steps):
        trainer.train_step()
    after = eval_loss(model, sched, *evals)
    assert after < 0.5 * before, (before, after)


class TwoBranch(torch.nn.Module):
    """Per pixel: to_out(gelu([to_q(x[:4]), to_k(x[4:])])). The two adapted layers read disjoint
    inputs and to_out is square, so a change in either is visible and cannot hide in the other."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_q, self.to_k, self.to_out = (
            torch.nn.Linear(4, 4),
            torch.nn.Linear(4, 4),
            torch.nn.Linear(8, 8),
        )

    def forward(self, x, t, cond):
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)
        y = self.to_out(
            torch.nn.functional.gelu(torch.cat([self.to_q(tok[..., :4]), self.to_k(tok[..., 4:])], -1))
        )
        return y.transpose(1, 2).reshape(b, c, h, w)


def test_planted_low_rank_change_is_recovered():
    """Teacher = base + a rank-2 change in two layers. With zero latents x_t = sqrt(1-a) eps, so
    predicting student - teacher + x_t / sqrt(1-a) makes the trainer's loss ||student - teacher||^2."""
    teacher, student = TwoBranch(seed=5), TwoBranch(seed=5)
    g = torch.Generator().manual_seed(0)
    planted = {}
    for path in ("to_q", "to_k"):
        w = teacher.get_submodule(path).weight
        delta = 0.5 * torch.randn(4, 2, generator=g) @ torch.randn(2, 4, generator=g) / 2
        with torch.no_grad():
            w += delta
        planted["lora_unet_" + path] = delta
    data = FixedData(torch.zeros(8, 8, 4, 4), torch.zeros(8, 1, 1), batch_size=8)
    sched = schedule()

    def predict(x, t, cond):
        with torch.no_grad():
            ref = teacher(x, t, cond)
        scale = (1 - sched.alphas_cumprod[t].float()).sqrt().reshape(-1, 1, 1, 1)
        return student(x, t, cond) - ref + x / scale

    student.requires_grad_(False)
    net = LoraNetwork([Target(f"lora_unet_{p}", p, student.get_submodule(p)) for p in ("to_q", "to_k")], 2, 2)
    net.attach()
    cfg = TrainConfig(steps=300, lr=3e-3, batch_size=8, max_grad_norm=0, weight_decay=0)
    trainer = Trainer(cfg, data, predict, sched, net)

    def rel_error():
        num = den = 0.0
        for name, b in net.branches.items():
            learned = (b.up @ b.down).detach() * b.scale  # (out, r) @ (r, in)
            num += (learned - planted[name]).square().sum().item()
            den += planted[name].square().sum().item()
        return (num / den) ** 0.5

    errors = [rel_error()]
    for _ in range(6):
        for _ in range(cfg.steps // 6):
            trainer.train_step()
        errors.append(rel_error())
    assert errors[0] == pytest.approx(1.0, abs=0.05)
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.05, errors


def _plan(tmp_path, name="run", every=0, keep=3):
    return CheckpointPlan(folder=tmp_path / name, name=name, every=every, keep_last=keep, dtype="fp32")


RESUME_CFG = dict(steps=9, batch_size=2, grad_accum=2, lr=5e-3, seed=7, scheduler="cosine", warmup_steps=2,
                  min_snr_gamma=5, noise_offset=0.05)  # fmt: skip


@pytest.mark.parametrize("optimizer", ["AdamW", "Lion", "SGD"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    opts = latent_dataset().options
    from dataclasses import replace

    ds_opts = replace(opts, shuffle_tags=True, caption_dropout=0.3)
    cfg = TrainConfig(optimizer=optimizer, **RESUME_CFG)
    ref, _ = make_trainer(cfg, data=batches(latent_dataset(options=ds_opts), 2), dora=True)
    ref.encode = lambda caps: {
        "context": torch.stack([torch.full((TOKENS, CTX), float(len(c))) for c in caps])
    }
    full = fit(ref, _plan(tmp_path, "full"), RunInfo())

    first, _ = make_trainer(cfg, data=batches(latent_dataset(options=ds_opts), 2), dora=True)
    first.encode = ref.encode
    part = fit(first, _plan(tmp_path, "split"), RunInfo(), stop_after=4)
    assert part.step == 4 and (tmp_path / "split" / "split-step000004.safetensors").exists()
    second, _ = make_trainer(cfg, data=batches(latent_dataset(options=ds_opts), 2), dora=True)
    second.encode = ref.encode
    done = fit(second, _plan(tmp_path, "split"), RunInfo())
    assert done.resumed_from == 4 and done.step == 9
    for k, v in weights(ref).items():
        assert (weights(second)[k] - v).abs().max().item() <= 1e-6, k
    assert done.losses == pytest.approx(full.losses, abs=1e-6)
    assert done.lrs == pytest.approx(full.lrs)


def test_error_mid_step_saves_last_completed_step_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, lr=5e-3, seed=3)
    ref, _ = make_trainer(cfg)
    fit(ref, _plan(tmp_path, "ref"), RunInfo())

    model = TinyUNet()
    calls = {"n": 0}
    inner = predictor(model)

    def flaky(x, t, cond):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4, as ComfyUI's cancel raises from inside a layer
            raise KeyboardInterrupt("cancelled")
        return inner(x, t, cond)

    broken, _ = make_trainer(cfg, model=model, predict=flaky)
    with pytest.raises(KeyboardInterrupt):
        fit(broken, _plan(tmp_path, "cut"), RunInfo())
    saved = tmp_path / "cut" / "cut-step000003.safetensors"
    assert saved.exists()
    info = json.loads((tmp_path / "cut" / "cut-step000003.trainstate.json").read_text())
    assert info["step"] == 3
    again, _ = make_trainer(cfg)
    fit(again, _plan(tmp_path, "cut"), RunInfo())
    for k, v in weights(ref).items():
        assert (weights(again)[k] - v).abs().max().item() <= 1e-6


def test_interrupt_from_step_callback_stops_within_one_step(tmp_path):
    cfg = TrainConfig(steps=50, batch_size=2, seed=1)
    trainer, _ = make_trainer(cfg)

    class Interrupted(Exception):
        pass

    def on_step(report):
        if report.step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        fit(trainer, _plan(tmp_path), RunInfo(), on_step=on_step)
    assert trainer.step == 2
    assert (tmp_path / "run" / "run-step000002.trainstate.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = TinyUNet()
    inner = predictor(model)
    state = {"calls": 0}

    def predict(x, t, cond):
        state["calls"] += 1
        out = inner(x, t, cond)
        return out * float("nan") if state["calls"] >= 5 else out

    cfg = TrainConfig(steps=10, batch_size=2, seed=0)
    trainer, _ = make_trainer(cfg, model=model, predict=predict)
    plan = _plan(tmp_path, every=2)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5.*last good checkpoint is run-step000004"):
        fit(trainer, plan, RunInfo())
    files = sorted(p.name for p in plan.folder.iterdir())
    assert "run-step000004.safetensors" in files and not any("step000005" in f for f in files)
    assert "run.safetensors" not in files
    good = safetensors.torch.load_file(str(plan.folder / "run-step000004.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())


def test_keep_last_and_final_file(tmp_path):
    cfg = TrainConfig(steps=7, batch_size=2)
    trainer, _ = make_trainer(cfg)
    plan = _plan(tmp_path, every=2, keep=2)
    result = fit(trainer, plan, RunInfo(base_model="tiny.safetensors", resolution=64))
    names = sorted(p.name for p in plan.folder.iterdir())
    assert names == [
        "run-step000004.safetensors", "run-step000004.trainstate", "run-step000004.trainstate.json",
        "run-step000006.safetensors", "run-step000006.trainstate", "run-step000006.trainstate.json",
        "run.safetensors", "run.trainstate", "run.trainstate.json",
    ]  # fmt: skip
    assert result.path == plan.folder / "run.safetensors"
    with safetensors.safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_steps"] == "7" and meta["ss_network_dim"] == "4" and meta["ss_optimizer"] == "AdamW"
    assert meta["ss_sd_model_name"] == "tiny.safetensors" and meta["ss_resolution"] == "(64, 64)"
    names = set(trainer.networks["unet"].branches)
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_up.weight", "lora_down.weight", "alpha")}


def test_resume_refuses_changed_settings(tmp_path):
    trainer, _ = make_trainer(TrainConfig(steps=3, batch_size=2))
    fit(trainer, _plan(tmp_path), RunInfo(), stop_after=2)
    other, _ = make_trainer(TrainConfig(steps=3, batch_size=2, lr=1e-3))
    with pytest.raises(ValueError, match=r"settings changed.*lr: 0.0001 -> 0.001"):
        fit(other, _plan(tmp_path), RunInfo())


def test_more_steps_continue_a_finished_run(tmp_path):
    trainer, _ = make_trainer(TrainConfig(steps=3, batch_size=2))
    fit(trainer, _plan(tmp_path), RunInfo())
    more, _ = make_trainer(TrainConfig(steps=5, batch_size=2))
    result = fit(more, _plan(tmp_path), RunInfo())
    assert result.resumed_from == 3 and result.step == 5 and len(result.losses) == 5


@pytest.mark.parametrize(
    "changes",
    [
        dict(optimizer="Adam"), dict(optimizer="Lion"), dict(optimizer="SGD", lr=1e-2), dict(loss="Huber"),
        dict(precision="bf16"), dict(precision="fp16"), dict(grad_accum=3), dict(epochs=2),
        dict(scheduler="cosine_with_restarts", cycles=2, warmup_ratio=0.2), dict(scheduler="polynomial", power=2),
        dict(loraplus_ratio=16), dict(min_snr_gamma=5, noise_offset=0.1), dict(max_grad_norm=0),
    ],
)  # fmt: skip
def test_options_run_and_change_the_weights(changes):
    cfg = TrainConfig(**{"steps": 4, "batch_size": 2, "lr": 1e-3, **changes})
    trainer, _ = make_trainer(cfg)
    before = weights(trainer)
    while trainer.step < trainer.total_steps:
        report = trainer.train_step()
        assert report.loss == report.loss and report.lr > 0
    after = weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if "epochs" in changes:
        per_epoch = len(trainer.data.epoch_order(0, cfg.seed))
        assert trainer.total_steps == 2 * per_epoch and trainer.epoch >= 1


def test_loraplus_moves_up_faster():
    base, _ = make_trainer(TrainConfig(steps=1, batch_size=2, optimizer="SGD", lr=1e-2, max_grad_norm=0))
    plus, _ = make_trainer(
        TrainConfig(steps=1, batch_size=2, optimizer="SGD", lr=1e-2, max_grad_norm=0, loraplus_ratio=4)
    )
    base.train_step()
    plus.train_step()
    for (k, a), b in zip(weights(base).items(), weights(plus).values(), strict=True):
        ratio = 4 if k.endswith(".up") else 1
        torch.testing.assert_close(b, a * ratio if k.endswith(".up") else a, rtol=1e-4, atol=1e-7), (k, ratio)


def test_text_encoder_network_gets_its_own_lr():
    model = TinyUNet()
    te_model = torch.nn.Sequential(torch.nn.Linear(CTX, CTX))
    te_targets = [t for t in targets(te_model, "lora_te_")]
    te = LoraNetwork(te_targets, rank=2, alpha=2, seed=0)
    te.attach()
    ds = latent_dataset()

    def encode(captions):
        return {"context": te_model(torch.ones(len(captions), TOKENS, CTX))}

    cfg = TrainConfig(steps=3, batch_size=2, te_lr=5e-4)
    unet = LoraNetwork(select_targets(targets(model), "attention"), rank=2, alpha=2)
    unet.attach()
    model.requires_grad_(False)
    te_model.requires_grad_(False)
    trainer = Trainer(cfg, batches(ds), predictor(model), schedule(), unet, te=te, encode=encode)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 1e-4, 5e-4, 5e-4]
    for _ in range(3):
        trainer.train_step()
    assert te.branches["lora_te_0"].up.abs().max() > 0
    with pytest.raises(ValueError, match="te_lr"):
        Trainer(TrainConfig(steps=1), batches(ds), predictor(model), schedule(), unet, te=te)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="`optimizer` should be one of"):
        TrainConfig(optimizer="Adafactor")
    with pytest.raises(ValueError, match="`batch_size` should be at least 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="`warmup_ratio`"):
        TrainConfig(warmup_ratio=1.5)
