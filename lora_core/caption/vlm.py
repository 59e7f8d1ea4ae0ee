"""A vision-language captioner loaded from a local folder with transformers: batched, padded generation with
the KV cache; never downloads, never runs code from the folder, reads safetensors weights only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .vlm_files import CaptionerError, CaptionerFolder, Family, inspect_captioner

DTYPES = ("float32", "bfloat16", "float16")
SAMPLING_SEED = 0  # temperature > 0 draws from a fixed seed, so a run can be repeated


@dataclass(frozen=True)
class Answer:
    """One image's generated text and whether the model ended it (False: max tokens cut it)."""

    text: str
    finished: bool


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 160
    temperature: float = 0.0


def _transformers_class(family: Family):
    try:
        import transformers
    except ImportError as error:
        raise CaptionerError(
            f"{family.label} captioners need transformers >= {family.min_transformers}, which is not installed: "
            "pip install transformers (with ComfyUI's Python)"
        ) from error
    model_class = getattr(transformers, family.model_class, None)
    if model_class is None:
        raise CaptionerError(
            f"{family.label} needs transformers >= {family.min_transformers}; this ComfyUI has "
            f"{transformers.__version__}: update it with ComfyUI's Python (pip install -U transformers)"
        )
    return transformers, model_class


def _load_failed(files: CaptionerFolder, what: str, error: Exception) -> CaptionerError:
    return CaptionerError(
        f"{files.family.label} folder {files.path} could not be loaded ({what}): {type(error).__name__}: {error}. "
        "Is it a complete transformers download of this model?"
    )


def load_captioner(folder: Path | CaptionerFolder, dtype: str = "float32") -> VlmCaptioner:
    """Model and processor from a checked folder, on the CPU in `dtype`; the caller moves it to its device."""
    files = folder if isinstance(folder, CaptionerFolder) else inspect_captioner(Path(folder))
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` should be one of {', '.join(DTYPES)}, got {dtype!r}")
    import torch

    transformers, model_class = _transformers_class(files.family)
    local = {"local_files_only": True, "trust_remote_code": False}
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(files.path), **local)
    except Exception as error:  # transformers raises many kinds for a broken folder
        raise _load_failed(files, "its processor or tokenizer files", error) from error
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise CaptionerError(
            f"{files.path}: transformers found no tokenizer and image processor pair there "
            f"({type(processor).__name__}); download the model's processor and tokenizer files"
        )
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = model_class.from_pretrained(
            str(files.path), use_safetensors=True, **local, **{dtype_arg: getattr(torch, dtype)}
        )
    except Exception as error:
        raise _load_failed(files, "its config or safetensors weights", error) from error
    return VlmCaptioner(files, model.eval(), processor)


class _StopCheck:
    """A transformers stopping criterion that only asks ComfyUI whether Cancel was pressed (it raises)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = bool(self.should_stop())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class VlmCaptioner:
    """One loaded model with its processor. `generate` captions a batch of images in one padded call."""

    def __init__(self, files: CaptionerFolder, model, processor):
        self.files = files
        self.family = files.family
        self.model = model
        self.processor = processor
        if self.family.decoder_only:
            # Left padding: every row's answer then starts at the same column, right after the prompt.
            processor.tokenizer.padding_side = "left"
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> frozenset[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.processor.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return frozenset(int(i) for i in ids if i is not None)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def prompt_text(self, instruction: str) -> str:
        """The full prompt for one image: the model's chat template around the image and the instruction."""
        if self.family.task_tokens:
            return instruction
        if not getattr(self.processor, "chat_template", None):
            raise CaptionerError(
                f"{self.files.path} has no chat template (chat_template.jinja, or chat_template in its "
                "tokenizer or processor config): download it with the model"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, images: list, prompts: list[str]) -> dict:
        """The padded batch on the model's device; floating inputs (pixels) in the model's dtype."""
        texts = [self.prompt_text(p) for p in prompts]
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        device, dtype = self.device, self.dtype
        return {
            key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for key, value in batch.items()
        }

    def generate(
        self,
        images: list,
        prompts: list[str],
        options: Generation,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Answer]:
        """One answer per (image, prompt), from a single generate call over the padded batch."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        inputs = self.inputs(images, prompts)
        sampling = options.temperature > 0
        kwargs = {
            "max_new_tokens": options.max_new_tokens,
            "do_sample": sampling,
            "num_beams": 1,
            "use_cache": True,
        }
        if sampling:
            kwargs["temperature"] = options.temperature
        else:  # a model's own sampling defaults (top_p, top_k) do not apply to greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if should_stop is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopCheck(should_stop)])
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(SAMPLING_SEED)
            out = self.model.generate(**inputs, **kwargs)
        # Decoder-only models return prompt + answer; encoder-decoder ones the decoder's start token + answer
        # (for BART-style decoders that start token is the end token itself, so it must not count as an end).
        start = inputs["input_ids"].shape[1] if self.family.decoder_only else 1
        return [self._answer(row) for row in out[:, start:].tolist()]

    def _answer(self, ids: list[int]) -> Answer:
        finished = any(i in self.eos_ids for i in ids)
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return Answer(text.strip(), finished)
