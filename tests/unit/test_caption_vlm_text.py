"""Sentence captions: instructions from presets, and answers cleaned into one caption line."""

import pytest

from lora_foundry.lora_core.caption.vlm_text import (
    HINT_INTRO,
    PRESETS,
    SentenceOptions,
    clean_caption,
    drop_cut_sentence,
    florence_task,
    instruction,
    merge_sentences,
    replace_phrase,
    strip_preamble,
)


def test_presets_weave_or_lead_with_the_trigger_and_add_hints():
    woven = instruction(SentenceOptions(preset="training (trigger woven in)", trigger_word="zqx"))
    assert "'zqx'" in woven
    first = instruction(SentenceOptions(preset="training (trigger first)", trigger_word="zqx"))
    assert "zqx" not in first  # put first by the cleaner, not asked of the model
    hinted = instruction(SentenceOptions(preset="short"), ["red hat", "cat"])
    assert hinted == PRESETS["short"] + " " + HINT_INTRO + "red hat, cat."


def test_custom_prompt_fills_trigger_and_tags_literally():
    options = SentenceOptions(
        preset="custom", custom_prompt="Caption {trigger}; tags {tags} {0} {x!r}", trigger_word="zq"
    )
    assert instruction(options, ["a", "b"]) == "Caption zq; tags a, b {0} {x!r}"  # no str.format of user text
    with pytest.raises(ValueError, match="custom_prompt"):
        SentenceOptions(preset="custom")
    with pytest.raises(ValueError, match="Florence-2"):
        florence_task(options)


@pytest.mark.parametrize(
    "field, value",
    [("preset", "poem"), ("max_new_tokens", 0), ("temperature", -0.1), ("trigger_word", "a,b")],
)
def test_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SentenceOptions(**{field: value})


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The image shows a cat on a mat.", "A cat on a mat."),
        ("In this picture, a dog runs.", "A dog runs."),
        ("This photograph depicts two people.", "Two people."),
        ("The image showsmanship is odd.", "The image showsmanship is odd."),  # not a whole-word opening
        ("A cat.", "A cat."),
    ],
)
def test_strip_preamble(answer, expected):
    assert strip_preamble(answer) == expected


def test_cut_sentence_dropped_only_when_another_one_finished():
    assert drop_cut_sentence("A cat sits. It wears a red") == "A cat sits."
    assert drop_cut_sentence("A cat sits on a") == "A cat sits on a"  # nothing finished: keep what there is
    assert drop_cut_sentence("A cat sits!") == "A cat sits!"


def test_replace_phrase_whole_words_any_case_no_regex():
    assert replace_phrase("A Red hat and a redhead.", "red", "blue") == "A blue hat and a redhead."
    assert replace_phrase("a (b) c.* d", "(b) c.*", "x") == "a x d"  # regex characters are plain text


def test_clean_caption_one_line_trigger_first_excludes_and_replacements():
    options = SentenceOptions(trigger_word="zqx", exclude=("blurry",), replacements=(("woman", "person"),))
    answer = "The image shows a woman\nin a blurry garden.\n\nShe holds a cup of"
    assert clean_caption(answer, options, finished=False) == "zqx, A person in a garden."
    # finished answers keep their last sentence even without a full stop
    assert clean_caption("a woman smiles", options, finished=True) == "zqx, a person smiles"


def test_woven_trigger_is_not_repeated_but_added_when_missing():
    woven = SentenceOptions(preset="training (trigger woven in)", trigger_word="zqx")
    assert clean_caption("A photo of zqx in a park.", woven, True) == "A photo of zqx in a park."
    assert clean_caption("A photo in a park.", woven, True) == "zqx, A photo in a park."
    first = SentenceOptions(preset="training (trigger first)", trigger_word="zqx")
    assert clean_caption("A photo of zqx.", first, True) == "zqx, A photo of zqx."
    assert clean_caption("zqx stands.", first, True) == "zqx stands."


def test_append_merges_once():
    assert merge_sentences("An old caption", "A new one.") == "An old caption. A new one."
    assert merge_sentences("Old. A new one.", "A new one.") == "Old. A new one."
    assert merge_sentences("", "New.") == "New."
