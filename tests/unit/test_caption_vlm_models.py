"""Vision-language captioners end to end on tiny random models of each family, saved as a user downloads them:
folder in, sidecars out; the batched path gives what the model's own generate gives one image at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_tagger import build_tiny_tagger
from tiny_vlm import build_tiny_vlm

from lora_foundry.lora_core.caption.captioning import RunOptions
from lora_foundry.lora_core.caption.captions import CaptionOptions
from lora_foundry.lora_core.caption.tagger import clear_tagger_cache, get_tagger
from lora_foundry.lora_core.caption.vlm import Generation, load_captioner
from lora_foundry.lora_core.caption.vlm_run import TagHints, caption_folder_vlm
from lora_foundry.lora_core.caption.vlm_text import SentenceOptions, clean_caption, florence_task, instruction

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "florence2")
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (10, 10, 10)]
TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {family: build_tiny_vlm(root / family, family, seed=3) for family in FAMILIES}


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (40 + 12 * i, 56 - 4 * i), colour).save(folder / f"img{i}.png")
    return folder


def _one_by_one(folder: Path, images: Path, options: SentenceOptions) -> list[str]:
    """The reference: transformers' processor and generate on each image alone, greedy, no padding."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(str(folder), local_files_only=True).eval()
    eos = model.generation_config.eos_token_id
    captions = []
    for path in sorted(images.glob("*.png")):
        image = Image.open(path).convert("RGB")
        if config.model_type == "florence2":
            text, skip = florence_task(options), 1
        else:
            turn = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": instruction(options)}],
                }
            ]
            text, skip = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False), None
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
        new = out[0, skip or inputs["input_ids"].shape[1] :].tolist()
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        captions.append(clean_caption(answer, options, finished=eos in new))
    return captions


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_in_sidecars_out_batched_equals_one_by_one(tmp_path, models, family):
    images = _images(tmp_path / "data")
    options = SentenceOptions(max_new_tokens=TOKENS, trigger_word="zqx")
    captioner = load_captioner(models[family])
    report = caption_folder_vlm(images, captioner, options, RunOptions(mode="overwrite", batch_size=3))
    written = [(images / f"img{i}.txt").read_text() for i in range(len(COLOURS))]
    assert len(report.tagged) == len(COLOURS) and not report.failed
    assert written == [c + "\n" for c in _one_by_one(models[family], images, options)]
    assert all(line.startswith("zqx, ") and line.count("\n") == 1 for line in written)
    again = caption_folder_vlm(images, captioner, options, RunOptions(mode="overwrite", batch_size=2))
    assert [t.tags for t in again.tagged] == [t.tags for t in report.tagged]  # greedy: same every run
    assert f"({captioner.family.label}) ran on cpu in float32" in report.summary()


@pytest.mark.timeout(300)
def test_skip_and_append_modes_and_stop_between_batches(tmp_path, models):
    images = _images(tmp_path / "data")
    (images / "img0.txt").write_text("kept by skip\n")
    (images / "img1.txt").write_text("An old caption\n")
    captioner = load_captioner(models["qwen2_5_vl"])
    options = SentenceOptions(max_new_tokens=6)
    report = caption_folder_vlm(images, captioner, options, RunOptions(mode="skip", batch_size=2))
    assert (images / "img0.txt").read_text() == "kept by skip\n"
    assert {p.path.name for p in report.skipped} == {"img0.png", "img1.png"}
    (images / "img3.txt").unlink()
    polls = []

    def stop_after_first_batch() -> bool:
        polls.append(1)
        return len(polls) > 1

    stopped = caption_folder_vlm(
        images,
        captioner,
        options,
        RunOptions(mode="append", batch_size=2),
        should_stop=stop_after_first_batch,
    )
    assert stopped.stopped and [t.image.name for t in stopped.tagged] == ["img0.png", "img1.png"]
    assert (images / "img1.txt").read_text().startswith("An old caption. ")
    assert not (images / "img3.txt").exists()  # after the stop: untouched


@pytest.mark.timeout(300)
def test_cancel_raised_while_generating_stops_the_run(tmp_path, models):
    images = _images(tmp_path / "data")
    captioner = load_captioner(models["llava"])
    calls = []

    def cancel_on_the_third_poll() -> bool:
        calls.append(1)
        if len(calls) == 3:  # 1: before the batch, 2: first generated token, 3: second token
            raise KeyboardInterrupt("cancel")
        return False

    with pytest.raises(KeyboardInterrupt):
        caption_folder_vlm(images, captioner, SentenceOptions(max_new_tokens=8), RunOptions(mode="overwrite"),
                           should_stop=cancel_on_the_third_poll)  # fmt: skip
    assert not list(images.glob("*.txt"))


@pytest.mark.timeout(300)
def test_tag_hints_reach_the_prompt_with_excludes_applied(tmp_path, models, monkeypatch):
    clear_tagger_cache()
    tagger = get_tagger(
        build_tiny_tagger(
            tmp_path / "tagger", [("red_hat", 0), ("blurry", 0), ("cat", 0)], probs=[0.9, 0.9, 0.1]
        )
    )
    captioner = load_captioner(models["qwen2_5_vl"])
    seen: list[str] = []
    real = captioner.generate
    monkeypatch.setattr(
        captioner,
        "generate",
        lambda images, prompts, *a, **k: seen.extend(prompts) or real(images, prompts, *a, **k),
    )
    options = SentenceOptions(max_new_tokens=4, tag_hints=True, preset="short")
    hints = TagHints(tagger, CaptionOptions(exclude=("blurry",)))
    caption_folder_vlm(_images(tmp_path / "data"), captioner, options, RunOptions(mode="overwrite"), hints)
    assert len(seen) == len(COLOURS)
    assert all(p.endswith("These tags describe the image and may help: red hat.") for p in seen), seen[0]


@pytest.mark.timeout(300)
def test_sampling_with_temperature_repeats_and_differs_from_greedy(tmp_path, models):
    images = [Image.new("RGB", (48, 48), c) for c in COLOURS[:2]]
    captioner = load_captioner(models["qwen3_vl"])
    prompts = ["Describe this image."] * 2
    hot = Generation(max_new_tokens=12, temperature=1.5)
    first, second = captioner.generate(images, prompts, hot), captioner.generate(images, prompts, hot)
    greedy = captioner.generate(images, prompts, Generation(max_new_tokens=12))
    assert first == second
    assert first != greedy


@pytest.mark.timeout(300)
def test_half_precision_runs(tmp_path, models):
    captioner = load_captioner(models["qwen2_5_vl"], dtype="bfloat16")
    assert captioner.dtype == torch.bfloat16
    answers = captioner.generate(
        [Image.new("RGB", (48, 48), (9, 9, 9))], ["Describe."], Generation(max_new_tokens=4)
    )
    assert len(answers) == 1 and answers[0].text


def test_folder_copy_is_what_a_user_downloads(models):
    names = {p.name for p in models["qwen2_5_vl"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".py")) for n in names)  # no pickle, no remote code
