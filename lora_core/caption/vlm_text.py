"""Sentence captions: the instruction a captioner is given (presets, trigger word, tag hints) and the text it
answers turned into a caption line (preamble, line breaks, a sentence cut by max tokens, exclusions,
replacements, the trigger word). Plain string work: no regex is built from user text."""

from __future__ import annotations

from dataclasses import dataclass

PRESETS = {
    "detailed": "Describe this image in detail in one paragraph: the subject, clothing, pose, setting, "
    "lighting, colours and style.",
    "short": "Describe this image in one short sentence.",
    "training (trigger woven in)": "Write one paragraph describing this image as a caption for training an "
    "image model. Refer to the main subject as '{trigger}' and use that word naturally in the text.",
    "training (trigger first)": "Write one paragraph describing this image as a caption for training an "
    "image model: the subject, clothing, pose, setting, lighting and style. Do not start with 'This image'.",
    "custom": "",
}
# Florence-2 answers task tokens, not instructions; each preset maps to its nearest task.
FLORENCE_TASKS = {
    "detailed": "<MORE_DETAILED_CAPTION>",
    "short": "<CAPTION>",
    "training (trigger woven in)": "<DETAILED_CAPTION>",
    "training (trigger first)": "<DETAILED_CAPTION>",
}
HINT_INTRO = "These tags describe the image and may help: "
# Openings that say nothing about the picture, longest first so the longest match is removed.
PREAMBLES = tuple(
    sorted(
        (
            f"{lead} {noun} {verb}"
            for lead in ("the", "this", "in this", "in the")
            for noun in ("image", "picture", "photo", "photograph", "illustration", "artwork")
            for verb in (
                "shows",
                "depicts",
                "features",
                "showcases",
                "presents",
                "captures",
                "is of",
                "displays",
            )
        ),
        key=len,
        reverse=True,
    )
) + ("in this image,", "in the image,", "in this picture,", "in this photo,")
SENTENCE_ENDS = (".", "!", "?")


@dataclass(frozen=True)
class SentenceOptions:
    """What a sentence caption is asked for and how the answer is cleaned."""

    preset: str = "detailed"
    custom_prompt: str = ""  # used when preset is 'custom'; '{trigger}' and '{tags}' are filled in
    trigger_word: str = ""
    exclude: tuple[str, ...] = ()  # phrases removed from the caption (whole words, any case)
    replacements: tuple[tuple[str, str], ...] = ()  # 'old phrase' -> 'new phrase'
    strip_preamble: bool = True
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: greedy, the same caption every run
    tag_hints: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` should be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.preset == "custom" and not self.custom_prompt.strip():
            raise ValueError(
                "`preset` is 'custom' but `custom_prompt` is empty: write the instruction to give"
            )
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"`max_new_tokens` should be between 1 and 4096, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"`temperature` should be between 0 and 5, got {self.temperature}")
        if "\n" in self.trigger_word or "," in self.trigger_word:
            raise ValueError(
                f"`trigger_word` should be one word or phrase on one line, got {self.trigger_word!r}"
            )

    @property
    def woven(self) -> bool:
        """The trigger word is asked for inside the text rather than put first."""
        return _woven(self)


def _woven(options: SentenceOptions) -> bool:
    return options.preset == "training (trigger woven in)" or (
        options.preset == "custom" and "{trigger}" in options.custom_prompt
    )


def instruction(options: SentenceOptions, tags: list[str] | None = None) -> str:
    """The text part of the user turn for one image."""
    trigger = options.trigger_word.strip()
    if options.preset == "custom":
        text = options.custom_prompt.strip()
        text = text.replace("{trigger}", trigger).replace("{tags}", ", ".join(tags or ()))
        return text
    text = PRESETS[options.preset]
    if options.preset == "training (trigger woven in)":
        text = text.replace("{trigger}", trigger or "the subject")
    if tags:
        text += " " + HINT_INTRO + ", ".join(tags) + "."
    return text


def florence_task(options: SentenceOptions) -> str:
    if options.preset == "custom":
        raise ValueError(
            "Florence-2 answers fixed tasks, not written instructions: choose the preset 'detailed', 'short' or a "
            "training one instead of 'custom'"
        )
    return FLORENCE_TASKS[options.preset]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def strip_preamble(text: str) -> str:
    """'The image shows a cat on a mat.' -> 'A cat on a mat.'"""
    lowered = text.lower()
    for opening in PREAMBLES:
        if lowered.startswith(opening) and (len(text) == len(opening) or not text[len(opening)].isalnum()):
            rest = text[len(opening) :].lstrip(" ,:;-")
            if rest.lower().startswith("that "):
                rest = rest[5:]
            return rest[:1].upper() + rest[1:] if rest else text
    return text


def drop_cut_sentence(text: str) -> str:
    """Text cut by max tokens ends mid-sentence: keep it up to the last finished sentence, if there is one."""
    if text.endswith(SENTENCE_ENDS):
        return text
    last = max(text.rfind(end) for end in SENTENCE_ENDS)
    return text[: last + 1] if last > 0 else text


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "_'-"


def replace_phrase(text: str, old: str, new: str) -> str:
    """Every whole-word, any-case occurrence of `old` in `text` replaced by `new` (literal text, no regex)."""
    old = old.strip()
    if not old:
        return text
    lowered, key = text.lower(), old.lower()
    out, start = [], 0
    while True:
        found = lowered.find(key, start)
        if found < 0:
            break
        end = found + len(key)
        before_ok = found == 0 or not _is_word_char(text[found - 1])
        after_ok = end == len(text) or not _is_word_char(text[end])
        out.append(text[start:found] + (new if before_ok and after_ok else text[found:end]))
        start = end
    out.append(text[start:])
    return "".join(out)


def _tidy(text: str) -> str:
    """Spaces and punctuation left behind when a phrase is removed."""
    text = _one_line(text)
    for gap, fixed in (
        (" ,", ","),
        (" .", "."),
        (",,", ","),
        (", ,", ","),
        (",.", "."),
        ("( )", ""),
        ("()", ""),
    ):
        while gap in text:
            text = text.replace(gap, fixed)
    return _one_line(text).strip(" ,;")


def with_trigger(text: str, trigger: str, woven: bool) -> str:
    """The trigger word put first; when it was to be woven in, only if the caption does not use it already."""
    trigger = trigger.strip()
    if not trigger:
        return text
    if woven and replace_phrase(text, trigger, "\0") != text:
        return text
    if (
        text.lower().startswith(trigger.lower())
        and replace_phrase(text[: len(trigger) + 1], trigger, "\0") != text[: len(trigger) + 1]
    ):
        return text
    return f"{trigger}, {text}" if text else trigger


def clean_caption(answer: str, options: SentenceOptions, finished: bool) -> str:
    """One caption line from a model's answer; `finished` is False when max tokens stopped it."""
    text = _one_line(answer).strip(" \"'")
    if not finished:
        text = drop_cut_sentence(text)
    if options.strip_preamble:
        text = strip_preamble(text)
    for old, new in options.replacements:
        text = replace_phrase(text, old, new)
    for phrase in options.exclude:
        text = replace_phrase(text, phrase, "")
    return with_trigger(_tidy(text), options.trigger_word, options.woven)


def merge_sentences(existing: str, new: str) -> str:
    """Append mode: the existing caption, then the new one unless it is already there."""
    existing = _one_line(existing)
    if not existing:
        return new
    if new.lower() in existing.lower():
        return existing
    joiner = " " if existing.endswith(SENTENCE_ENDS) else ". "
    return existing + joiner + new
