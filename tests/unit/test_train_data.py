"""Training data: buckets, folder scan with kohya repeat folders, captions, caching (memory and
disk), batches (one bucket each, deterministic order, flips, crops), schedules, loss curve."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lora_foundry.lora_core.train.buckets import cover_size, make_buckets, nearest_bucket
from lora_foundry.lora_core.train.dataset import (
    Batches,
    DatasetOptions,
    build_dataset,
    process_caption,
    scan_dataset,
    stack_conds,
    tag_frequency,
)
from lora_foundry.lora_core.train.loss import NoiseSchedule, min_snr_weights
from lora_foundry.lora_core.train.plot import loss_curve, smooth
from lora_foundry.lora_core.train.schedule import Schedule, warmup_from


def test_buckets_cover_aspects_within_area():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1600, 900), buckets)[0] > nearest_bucket((1600, 900), buckets)[1]
    assert nearest_bucket((900, 1600), buckets) == nearest_bucket((1600, 900), buckets)[::-1]
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert cover_size((1600, 900), (640, 384)) == (688, 384)
    with pytest.raises(ValueError, match="`resolution`"):
        make_buckets(100)


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "5_style").mkdir()
    (tmp_path / "misc").mkdir()
    for rel, size, caption in [
        ("wide.png", (128, 64), "tree, sky"),
        ("square.png", (64, 64), None),
        ("5_style/tall.png", (64, 128), "zkw, tree"),
    ]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / rel)
        if caption is not None:
            (tmp_path / rel).with_suffix(".txt").write_text(caption)
    return tmp_path


def test_scan_reads_repeat_folders_and_reports(tmp_path):
    scan = scan_dataset(_folder(tmp_path), DatasetOptions(resolution=64, default_repeats=2))
    by_name = {e.path.name: e for e in scan.entries}
    assert {n: e.repeats for n, e in by_name.items()} == {"wide.png": 2, "square.png": 2, "tall.png": 5}
    assert by_name["tall.png"].subset == "5_style" and by_name["square.png"].caption == ""
    assert scan.without_caption == 1
    assert [p.path.name for p in scan.problems] == ["misc"]
    with pytest.raises(FileNotFoundError, match="no images found"):
        scan_dataset(tmp_path / "misc", DatasetOptions(resolution=64))


def test_captions_trigger_shuffle_keep_dropout():
    opts = DatasetOptions(resolution=64, trigger_word="zkw", shuffle_tags=True, keep_tags=1)
    rng = random.Random(0)
    seen = {process_caption("a, b, zkw, c, d, e", opts, rng) for _ in range(50)}
    assert all(s.startswith("zkw, a, ") for s in seen) and len(seen) > 3
    assert all(sorted(s.split(", ")) == sorted(["zkw", "a", "b", "c", "d", "e"]) for s in seen)
    plain = DatasetOptions(resolution=64, trigger_word="zkw")
    assert process_caption("a, zkw, b", plain, rng) == "zkw, a, b"
    drop = DatasetOptions(resolution=64, caption_dropout=0.5)
    dropped = sum(process_caption("a", drop, rng) == "" for _ in range(400))
    assert 150 < dropped < 250
    freq = tag_frequency(scan_dataset_entries(), "zkw")
    assert freq == {"x": {"zkw": 2, "a": 2, "b": 1}}


def scan_dataset_entries():
    from pathlib import Path

    from lora_foundry.lora_core.train.dataset import ImageEntry

    return (ImageEntry(Path("1.png"), "a, b", 1, "x"), ImageEntry(Path("2.png"), "a, zkw", 1, "x"))


class FakeVae:
    """Latents = 8x8 average pools of the pixels (4 channels): deterministic and position-faithful."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pixels):
        self.calls += 1
        x = pixels.movedim(-1, 1)
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def fake_text(captions):
    return {"context": torch.stack([torch.full((2, 3), float(len(c))) for c in captions])}


def test_build_dataset_buckets_flip_crop_and_disk_cache(tmp_path):
    folder = _folder(tmp_path / "data")
    opts = DatasetOptions(resolution=128, flip=True, crop="random", trigger_word="zkw", caption_dropout=0.1)
    vae = FakeVae()
    scan = scan_dataset(folder, opts)
    ds = build_dataset(scan, opts, vae, fake_text, cache_dir=tmp_path / "cache", encoder_id="v1")
    buckets = {s.caption: s.bucket for s in ds.samples}
    assert (
        buckets["tree, sky"][0] > buckets["tree, sky"][1]
        and buckets["zkw, tree"][0] < buckets["zkw, tree"][1]
    )
    assert vae.calls == 6  # each image and its mirror
    s = ds.samples[0]
    torch.testing.assert_close(s.latent_flipped, s.latent.flip(-1))  # pooling commutes with the flip
    assert set(ds.conds) == {"zkw, tree, sky", "zkw", "zkw, tree", ""}
    again = build_dataset(scan, opts, vae, fake_text, cache_dir=tmp_path / "cache", encoder_id="v1")
    assert vae.calls == 6 and all(
        torch.equal(a.latent, b.latent) for a, b in zip(ds.samples, again.samples, strict=True)
    )
    build_dataset(scan, opts, vae, fake_text, cache_dir=tmp_path / "cache", encoder_id="v2")
    assert vae.calls == 12  # another encoder: not reused
    shuffled = build_dataset(scan, DatasetOptions(resolution=64, shuffle_tags=True), vae, fake_text)
    assert shuffled.conds == {}


def test_batches_one_bucket_each_deterministic_with_repeats(tmp_path):
    folder = _folder(tmp_path)
    opts = DatasetOptions(resolution=128, crop="random", default_repeats=2)
    ds = build_dataset(scan_dataset(folder, opts), opts, FakeVae(), fake_text)
    data = Batches(ds, batch_size=2)
    order = data.epoch_order(0, seed=3)
    assert order == data.epoch_order(0, seed=3) and order != data.epoch_order(1, seed=3)
    assert sorted(i for b in order for i in b) == sorted(
        i for i, s in enumerate(ds.samples) for _ in range(s.repeats)
    )
    assert all(len({ds.samples[i].bucket for i in b}) == 1 for b in order)
    g = torch.Generator().manual_seed(0)
    wide = next(i for i, s in enumerate(ds.samples) if s.bucket[0] > s.bucket[1])
    crops = {tuple(data.batch([wide], g, random.Random(0)).latents.flatten()[:6].tolist()) for _ in range(10)}
    assert len(crops) > 1
    batch = data.batch([wide, wide], g, random.Random(0))
    w, h = ds.samples[wide].bucket
    assert batch.latents.shape == (2, 4, h // 8, w // 8)
    assert batch.conds["context"].shape == (2, 2, 3)


def test_stack_conds_repeats_to_common_length():
    out = stack_conds([{"context": torch.ones(1, 2, 3)}, {"context": torch.zeros(1, 3, 3)}])
    assert out["context"].shape == (2, 6, 3)


def test_schedules():
    total = 100
    assert Schedule("constant", total, 10).factor(0) == 1.0
    warm = Schedule("constant_with_warmup", total, 9)
    assert [warm.factor(s) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    lin = Schedule("linear", total, 0)
    assert lin.factor(0) == 1.0 and lin.factor(50) == pytest.approx(0.5) and lin.factor(100) == 0.0
    cos = Schedule("cosine", total, 0)
    assert cos.factor(50) == pytest.approx(0.5) and cos.factor(100) == pytest.approx(0.0)
    restarts = Schedule("cosine_with_restarts", total, 0, cycles=2)
    assert restarts.factor(49) < 0.01 and restarts.factor(50) == pytest.approx(1.0)
    poly = Schedule("polynomial", total, 0, power=2)
    assert poly.factor(50) == pytest.approx(0.25)
    assert warmup_from(200, warmup_ratio=0.05) == 10 and warmup_from(200, 7, 0.5) == 7
    with pytest.raises(ValueError, match="`scheduler` should be one of"):
        Schedule("step", total)


def test_min_snr_weights():
    sched = NoiseSchedule(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64))
    t = torch.tensor([0, 500, 999])
    w = min_snr_weights(sched, t, 5.0)
    snr = sched.snr(t)
    torch.testing.assert_close(w, torch.clamp(snr, max=5) / snr)
    assert w[0] < 1 and w[2] == pytest.approx(1.0)
    assert torch.equal(min_snr_weights(sched, t, 0), torch.ones(3))
    v = NoiseSchedule(sched.alphas_cumprod, "v")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5) / (snr + 1))


def test_loss_curve_image():
    losses = [1 / (i + 1) + 0.05 * math.sin(i) for i in range(50)]
    image = loss_curve(losses, [1e-4 * (i + 1) / 50 for i in range(50)])
    assert (
        image.shape == (360, 640, 3) and image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1
    )
    assert loss_curve([], []).shape == (360, 640, 3)
    assert loss_curve([float("nan"), 1.0], [1e-4, 1e-4]).shape == (360, 640, 3)
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
