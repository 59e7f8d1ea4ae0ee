"""Tiny random vision-language captioners saved as a user downloads them: used by the VLM tests and the bench.

Each family is built from its own transformers config (a few layers, small width) with a word-level
tokenizer made here from a small vocabulary (nothing is downloaded), a chat template in the family's
format, and the family's image processor set to small images; `save_pretrained` writes the folder
(config.json, model.safetensors, tokenizer and processor files). The weights are random: captions are
word salad, but deterministic under greedy decoding, which is what the tests compare.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = [
    "a",
    "an",
    "the",
    "this",
    "image",
    "shows",
    "photo",
    "picture",
    "of",
    "in",
    "on",
    "with",
    "and",
    "is",
    "are",
    "woman",
    "man",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "sitting",
    "standing",
    "wearing",
    "hat",
    "dress",
    "tree",
    "sky",
    "city",
    "street",
    "room",
    "light",
    "dark",
    "smiling",
    "holding",
    "looking",
    "at",
    "camera",
    "background",
    "foreground",
    "close",
    "up",
    "portrait",
    "outdoor",
    "indoor",
    "night",
    "day",
    "sunny",
    "soft",
    "detailed",
    "style",
    ".",
    ",",
    "tags",
    ":",
    "describe",
    "caption",
    "write",
    "one",
    "sentence",
    "for",
    "training",
    "short",
    "include",
    "word",
]

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")  # fmt: skip
# The Qwen chat format (system turn omitted), images as vision_start, image_pad, vision_end.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_SPECIAL = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# Llama-3 style turns as JoyCaption uses them.
LLAVA_TEMPLATE = (
    "<s>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
FLORENCE_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "florence2")


def build_tokenizer(
    special: tuple[str, ...], unk: str, extra_words: tuple[str, ...] = (), named: dict | None = None
):
    """A word-level fast tokenizer: special tokens first (ids 0..), then the words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(special)}
    for word in (*WORDS, *extra_words):
        vocab.setdefault(word, len(vocab))
    if unk not in vocab:
        vocab[unk] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=unk, extra_special_tokens=named or {}
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t != unk]})
    return tokenizer


def _qwen_text(vocab: int, layers: int, width: int) -> dict:
    heads = 4
    half = width // heads // 2  # mrope sections cover half a head (temporal, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": section}, tie_word_embeddings=False)  # fmt: skip


def _save_qwen(folder: Path, family: str, layers: int, width: int, pixels: int) -> None:
    import transformers as tf

    tokenizer = build_tokenizer(QWEN_SPECIAL, "<|endoftext|>")
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = _qwen_text(len(tokenizer), layers, width)
    text.update(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)  # fmt: skip
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip
    if family == "qwen2_vl":
        config = tf.Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=32, hidden_size=width,
                                  mlp_ratio=2, in_chans=3), **tokens)  # fmt: skip
        model_cls, processor_cls, image_cls = (
            tf.Qwen2VLForConditionalGeneration,
            tf.Qwen2VLProcessor,
            tf.Qwen2VLImageProcessor,
        )
    elif family == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, out_hidden_size=width,
                                     fullatt_block_indexes=[1], window_size=56), **tokens)  # fmt: skip
        model_cls, processor_cls, image_cls = (
            tf.Qwen2_5_VLForConditionalGeneration,
            tf.Qwen2_5_VLProcessor,
            tf.Qwen2VLImageProcessor,
        )
    else:  # qwen3_vl: patch 16, no window attention, deepstack layers
        text = {k: v for k, v in text.items() if k != "rope_scaling"}
        text["head_dim"] = width // 4
        text["rope_scaling"] = {
            "rope_type": "default",
            "mrope_section": _qwen_text(1, 1, width)["rope_scaling"]["mrope_section"],
            "mrope_interleaved": True,
        }
        vision3 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
                       spatial_merge_size=2, out_hidden_size=width, num_position_embeddings=64, deepstack_visual_indexes=[1])  # fmt: skip
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision3, **tokens)
        model_cls, processor_cls, image_cls = (
            tf.Qwen3VLForConditionalGeneration,
            tf.Qwen3VLProcessor,
            tf.Qwen2VLImageProcessor,
        )
    model = model_cls(config).eval()
    patch = 16 if family == "qwen3_vl" else 14
    unit = patch * 2
    image_processor = image_cls(min_pixels=unit * unit, max_pixels=pixels, patch_size=patch, merge_size=2)
    if family == "qwen3_vl":
        image_processor.size = {"shortest_edge": unit * unit, "longest_edge": pixels}
    video = _qwen_video_processor(family, patch, unit, pixels)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                              chat_template=QWEN_TEMPLATE)  # fmt: skip
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _qwen_video_processor(family: str, patch: int, unit: int, pixels: int):
    import transformers as tf

    cls = tf.Qwen3VLVideoProcessor if family == "qwen3_vl" else tf.Qwen2VLVideoProcessor
    return cls(size={"shortest_edge": unit * unit, "longest_edge": pixels}, patch_size=patch, merge_size=2)


def _save_llava(folder: Path, layers: int, width: int, pixels: int) -> None:
    import transformers as tf

    tokenizer = build_tokenizer(LLAVA_SPECIAL, "<unk>")
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "<s>", "<|eot_id|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
    size = 28
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=ids["<s>"], eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<pad>"])  # fmt: skip
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=size, patch_size=7)  # fmt: skip
    config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                            vision_feature_select_strategy="full", vision_feature_layer=-2, pad_token_id=ids["<pad>"])  # fmt: skip
    model = tf.LlavaForConditionalGeneration(config).eval()
    image_processor = tf.SiglipImageProcessor(size={"height": size, "width": size})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                                  vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE)  # fmt: skip
    model.generation_config.eos_token_id = ids["<|eot_id|>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_florence(folder: Path, layers: int, width: int) -> None:
    import transformers as tf

    task_words = ("<MORE_DETAILED_CAPTION>", "<DETAILED_CAPTION>", "<CAPTION>")
    tokenizer = build_tokenizer(
        FLORENCE_SPECIAL,
        "<unk>",
        ("what", "does", "describe", "how", "paragraph", "shown"),
        {"image_token": "<image>"},
    )
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "<s>", "</s>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in FLORENCE_SPECIAL}
    text = dict(vocab_size=len(tokenizer), d_model=width, encoder_layers=layers, decoder_layers=layers,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * width,
                decoder_ffn_dim=2 * width, max_position_embeddings=512, pad_token_id=ids["<pad>"],
                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], decoder_start_token_id=ids["</s>"])  # fmt: skip
    vision = dict(in_channels=3, depths=[1, 1], embed_dim=[16, width], num_heads=[1, 2], num_groups=[1, 2],
                  patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
                  window_size=4, projection_dim=width, max_position_embeddings=16, max_temporal_embeddings=4)  # fmt: skip
    config = tf.Florence2Config(text_config=text, vision_config=vision, image_token_id=ids["<image>"])
    model = tf.Florence2ForConditionalGeneration(config).eval()
    image_processor = tf.CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                            do_center_crop=False, image_seq_length=65)  # fmt: skip
    processor = tf.Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.decoder_start_token_id = ids["</s>"]
    del task_words
    _quiet_end_token(model, ids["</s>"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _quiet_end_token(model, eos: int) -> None:
    """A random BART decoder fed its start token (which is also its end token) answers with that token at
    once, since input and output embeddings are tied; a small output row lets it say something first."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= 0.05


def build_tiny_vlm(folder: Path, family: str, seed: int = 0, layers: int = 2, width: int = 64,
                   pixels: int = 56 * 56) -> Path:  # fmt: skip
    """Write a tiny random captioner of `family` (one of FAMILIES) into `folder`; return the folder."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family should be one of {', '.join(FAMILIES)}, got {family!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family.startswith("qwen"):
        _save_qwen(folder, family, layers, width, pixels)
    elif family == "llava":
        _save_llava(folder, layers, width, pixels)
    else:
        _save_florence(folder, layers, width)
    return folder


def config_model_type(folder: Path) -> str:
    return json.loads((Path(folder) / "config.json").read_text())["model_type"]


if __name__ == "__main__":
    import sys

    out = build_tiny_vlm(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "qwen2_5_vl")
    print(out, sorted(p.name for p in out.iterdir()))
