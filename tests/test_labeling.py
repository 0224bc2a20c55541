"""Label config -> outputs, labels and detector prompts (precedence documented in labeling.py)."""

from __future__ import annotations

import pytest

from backend.labeling import LabelConfigError, parse_label_config, split_prompt

CONFIG = """
<View>
  <Image name="image" value="$img"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat" hint="kitty . small cat"/>
    <Label value="vehicle" predicted_values="car, truck,bus" hint="ignored"/>
    <Label value="red car"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image" model_score_threshold="0.4"><Label value="cat"/></PolygonLabels>
  <BitmaskLabels name="bits" toName="image"><Label value="dog"/></BitmaskLabels>
  <RectangleLabels name="skip" toName="image" model_skip="true"><Label value="cat"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat" smart="true"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>
"""


def test_outputs_types_labels_and_image_key() -> None:
    project = parse_label_config(CONFIG)
    assert project.image_name == "image" and project.image_value_key == "img"
    assert [(c.name, c.type) for c in project.outputs] == [
        ("tag", "brushlabels"), ("poly", "polygonlabels"), ("bits", "bitmasklabels")
    ]
    assert project.outputs[1].score_threshold == 0.4
    assert project.label_values() == ("cat", "vehicle", "red car", "dog")
    assert [c.name for c in project.prompt_controls] == ["kp", "prompt"]
    assert [c.name for c in project.mask_outputs_for("cat")] == ["tag", "poly"]
    # model_skip: never predicted into, but still known to exports
    assert [c.name for c in project.skipped_outputs] == ["skip"]
    assert [c.name for c in project.export_outputs()] == ["tag", "poly", "bits", "skip"]


def test_prompt_precedence_env_then_predicted_values_then_hint_then_value() -> None:
    project = parse_label_config(CONFIG, {"red car": ["crimson car", " red automobile "]})
    prompts = project.prompts_by_label()
    assert prompts["cat"] == ("kitty", "small cat")
    assert prompts["vehicle"] == ("car", "truck", "bus")
    assert prompts["red car"] == ("crimson car", "red automobile")
    assert prompts["dog"] == ("dog",)
    overridden = parse_label_config(CONFIG, {"vehicle": "automobile . lorry"}).prompts_by_label()
    assert overridden["vehicle"] == ("automobile", "lorry")


def test_bad_label_prompts_entry_is_named() -> None:
    with pytest.raises(LabelConfigError, match="'cat'"):
        parse_label_config(CONFIG, {"cat": 3})


def test_split_prompt() -> None:
    assert split_prompt(" car .  automobile . ") == ("car", "automobile")
    assert split_prompt("...") == ()


@pytest.mark.parametrize(
    ("xml", "phrase"),
    [
        ("", "empty"),
        ("<View>", "not valid XML"),
        ('<View><Image name="i" value="$i"/></View>', "no <BrushLabels>"),
        ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>', "no <BrushLabels>"),
        ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i" model_score_threshold="x">'
         '<Label value="a"/></BrushLabels></View>', "not a number"),
    ],
)
def test_unservable_configs_raise_sentences(xml: str, phrase: str) -> None:
    with pytest.raises(LabelConfigError, match=phrase):
        parse_label_config(xml)


def test_a_label_name_with_a_dot_is_one_phrase_not_two() -> None:
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image">
        <Label value="St. Bernard"/><Label value="3.5 inch floppy"/><Label value="dog" hint="dog . puppy"/>
      </BrushLabels></View>"""
    prompts = parse_label_config(xml).prompts_by_label()
    assert prompts["St. Bernard"] == ("St. Bernard",)
    assert prompts["3.5 inch floppy"] == ("3.5 inch floppy",)
    assert prompts["dog"] == ("dog", "puppy")  # a hint still separates synonyms with " . "
