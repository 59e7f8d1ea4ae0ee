"""Caption building: thresholds, ordering, exclusions, replacements, formatting, merging, parsing."""

import numpy as np
import pytest

from lora_foundry.lora_core.caption.captions import (
    CaptionOptions,
    build_caption,
    format_tag,
    merge_caption,
    parse_replacements,
    parse_tag_list,
    select_tags,
    tag_key,
)
from lora_foundry.lora_core.caption.tagger import TagList

TAGS = TagList(
    names=("general", "sensitive", "1girl", "long_hair", "smile", "^_^", "hat_(object)", "blurry", "solo",
           "hatsune_miku", "other_char"),
    categories=(9, 9, 0, 0, 0, 0, 0, 0, 0, 4, 4),
)  # fmt: skip
PROBS = np.array([0.9, 0.1, 0.95, 0.8, 0.5, 0.6, 0.7, 0.3, 0.35, 0.9, 0.6], np.float32)


def test_default_caption_order_and_format():
    tags = build_caption(PROBS, TAGS, CaptionOptions(trigger_word="mytrig"))
    # trigger, characters by score, general by score; 'solo' at exactly 0.35 is not above the threshold
    assert tags == ["mytrig", "hatsune miku", "1girl", "long hair", "hat \\(object\\)", "^_^", "smile"]


def test_ratings_are_never_tags():
    assert "general" not in build_caption(PROBS, TAGS, CaptionOptions(general_threshold=0.0))


def test_thresholds_apply_per_category():
    options = CaptionOptions(general_threshold=0.75, character_threshold=0.5)
    assert select_tags(PROBS, TAGS, options) == ["hatsune miku", "other char", "1girl", "long hair"]


def test_raw_underscores_and_brackets():
    options = CaptionOptions(replace_underscores=False, escape_brackets=False, general_threshold=0.65)
    assert select_tags(PROBS, TAGS, options) == ["hatsune_miku", "1girl", "long_hair", "hat_(object)"]


def test_always_first_exclude_replace_and_max():
    options = CaptionOptions(
        always_first=("smile", "hatsune_miku", "absent tag"),
        exclude=("long hair",),
        replacements=(("1girl", "1woman"), ("^_^", "")),
        max_tags=4,
    )
    assert select_tags(PROBS, TAGS, options) == ["smile", "hatsune miku", "1woman", "hat \\(object\\)"]


def test_replacement_onto_existing_tag_is_not_duplicated():
    options = CaptionOptions(replacements=(("long_hair", "1girl"),))
    assert select_tags(PROBS, TAGS, options).count("1girl") == 1


def test_trigger_word_is_not_repeated():
    assert build_caption(PROBS, TAGS, CaptionOptions(trigger_word="1girl")).count("1girl") == 1


def test_kaomoji_keeps_underscore_and_key():
    assert format_tag("^_^", CaptionOptions()) == "^_^"
    assert tag_key("Long_Hair") == tag_key("long hair") == "long hair"
    assert tag_key("hat \\(object\\)") == tag_key("hat_(object)")
    assert format_tag(format_tag("a_(b)", CaptionOptions()), CaptionOptions()) == "a \\(b\\)"


def test_merge_keeps_existing_and_adds_new_once():
    merged = merge_caption(
        "custom tag, 1girl, long hair\n", ["mytrig", "1girl", "smile", "long_hair"], "mytrig"
    )
    assert merged == ["mytrig", "custom tag", "1girl", "long hair", "smile"]


def test_parsers():
    assert parse_tag_list(" a, b_c\nd,, ") == ("a", "b_c", "d")
    assert parse_replacements("a -> b\nc->") == (("a", "b"), ("c", ""))
    with pytest.raises(ValueError, match="'old tag -> new tag'"):
        parse_replacements("a = b")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"general_threshold": 1.5}, "`general_threshold` should be between 0 and 1, got 1.5"),
        ({"character_threshold": -0.1}, "`character_threshold`"),
        ({"max_tags": -1}, "`max_tags`"),
        ({"exclude": ["a"]}, "`exclude` should be a tuple"),
        ({"trigger_word": "a, b"}, "`trigger_word`"),
    ],
)
def test_options_validate(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CaptionOptions(**kwargs)


def test_selection_matches_a_plain_reference_on_many_tags():
    """The vectorised selection equals the obvious loop: above threshold, by score, ties in csv order."""
    rng = np.random.default_rng(3)
    n = 3000
    tags = TagList(tuple(f"tag_{i}" for i in range(n)), tuple(int(c) for c in rng.choice([0, 4, 9], n)))
    probs = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)  # rounded: many exact ties
    options = CaptionOptions(replace_underscores=False, escape_brackets=False)
    expected = []
    for category, threshold in ((4, options.character_threshold), (0, options.general_threshold)):
        chosen = [i for i in range(n) if tags.categories[i] == category and probs[i] > threshold]
        expected += [tags.names[i] for i in sorted(chosen, key=lambda i: -float(probs[i]))]
    assert select_tags(probs, tags, options) == expected


def test_always_first_repeated_keeps_its_first_position():
    options = CaptionOptions(always_first=("smile", "smile", "long hair"))
    assert select_tags(PROBS, TAGS, options)[:2] == ["smile", "long hair"]
