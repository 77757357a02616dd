"""What the sentence encoder reads (``affectkit.features.inputs``): the recipe's round trip through a
checkpoint/encoder record, and the bounds of ``utterance_input``."""

from __future__ import annotations

import pytest

from affectkit.errors import ConfigError
from affectkit.features.inputs import InputRecipe, dialogue_inputs, utterance_input


@pytest.mark.parametrize("recipe", [InputRecipe(), InputRecipe(2, True, "|"), InputRecipe(context=5),
                                    InputRecipe(speaker=True)])
def test_recipe_round_trips_through_its_record(recipe):
    raw = recipe.to_dict()
    assert raw == {"context": recipe.context, "speaker": recipe.speaker, "sep": recipe.sep}
    assert InputRecipe.from_dict(raw) == recipe


def test_recipe_record_defaults_and_types():
    assert InputRecipe.from_dict({}) == InputRecipe(0, False, "[SEP]")
    r = InputRecipe.from_dict({"context": "3", "speaker": 1, "sep": 7})
    assert (r.context, r.speaker, r.sep) == (3, True, "7")
    assert type(r.context) is int and type(r.speaker) is bool and type(r.sep) is str


@pytest.mark.parametrize(("speakers", "sentences", "i"), [
    (["A", "B"], ["x", "y"], 2),   # past the end
    (["A", "B", "C"], ["x", "y"], 2),  # past the end of the sentences, not of the speakers
    (["A", "B"], ["x", "y"], -1),  # before the start
    (["A"], ["x", "y"], 1),        # no speaker for it
    ([], ["x"], 0),
])
def test_out_of_range_is_a_config_error(speakers, sentences, i):
    with pytest.raises(ConfigError, match=rf"^utterance {i} out of range for {len(sentences)} sentences$"):
        utterance_input(speakers, sentences, i, InputRecipe(context=1))


def test_the_last_utterance_with_its_past():
    speakers, sentences = ["A", "B", "A"], ["hi", "hello", "bye"]
    assert utterance_input(speakers, sentences, 2, InputRecipe(1, True)) == "B: hello [SEP] A: bye"
    assert dialogue_inputs(speakers, sentences, InputRecipe(2)) == ["hi", "hi [SEP] hello", "hi hello [SEP] bye"]
