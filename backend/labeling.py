"""What a project's label config asks of the backend: which image, which outputs, which prompts.

Parsing goes through ``label_studio_sdk.label_interface`` (the SDK Label Studio itself
maintains), and this module turns it into small frozen records the pipelines consume.

Prompt precedence for a label (first that is set wins), documented in the README:
1. ``LABEL_PROMPTS`` environment JSON (deployment-wide, the operator's word);
2. the Label's ``predicted_values="car,truck"`` attribute (the SDK's label-map convention);
3. the Label's ``hint`` attribute;
4. the label value itself.
A prompt string is split on ``.`` into phrases, so ``"car . automobile"`` is two phrases;
every phrase's detections are stored under the label.

A label's mode is ``thing`` (countable objects: detector boxes, one mask each) or ``stuff``
(amorphous regions such as sky or road: CLIPSeg heatmaps, when ``CLIPSEG_MODEL`` is set).
First that is set wins: ``LABEL_MODES`` environment JSON, the Label's ``mode="stuff"``
attribute, ``thing``. ``mode`` is its own attribute because ``hint`` already carries prompts.

Besides the ``*Labels`` output tags, a bare drawing tool (``<Brush>``, ``<Bitmask>``, ``<Polygon>``,
``<Rectangle>``) is an output when a ``<Labels>`` tag on the same image carries the ``<Label>``
values (the first such ``<Labels>``, config order). It becomes an ``OutputControl`` of the
matching ``*labels`` type with ``labels_name`` set, so the pipelines treat both styles alike and
only ``backend.regions`` writes (and reads back) Label Studio's two-result form of such regions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

MASK_TYPES = ("brushlabels", "bitmasklabels", "polygonlabels")
LABEL_MODES = ("thing", "stuff")
OUTPUT_TYPES = (*MASK_TYPES, "rectanglelabels")
# bare tools whose regions take their label from a separate <Labels> tag ("bitmask" -> "bitmasklabels")
SHAPE_TYPES = tuple(kind.removesuffix("labels") for kind in OUTPUT_TYPES)
PROMPT_TYPES = ("keypointlabels", "rectanglelabels", "textarea")


class LabelConfigError(ValueError):
    """The label config cannot be served; the message says why in a sentence for the user."""


@dataclass(frozen=True)
class LabelSpec:
    """One output label and the detector phrases that find it."""

    value: str
    prompts: tuple[str, ...]
    mode: str = "thing"  # one of LABEL_MODES


@dataclass(frozen=True)
class OutputControl:
    """A control tag the backend writes regions into."""

    name: str
    type: str  # one of OUTPUT_TYPES (lower case, as in result["type"])
    to_name: str
    labels: tuple[LabelSpec, ...]
    score_threshold: float | None = None  # the tag's model_score_threshold
    # the separate <Labels> tag of a bare tool (<Bitmask> + <Labels>); None for a *Labels tag
    labels_name: str | None = None

    @property
    def is_mask(self) -> bool:
        return self.type in MASK_TYPES

    @property
    def shape_type(self) -> str:
        """The bare tool's result type (``"bitmask"`` for ``"bitmasklabels"``): the ``type`` of
        the geometry result when Label Studio stores a region as two results."""
        return self.type.removesuffix("labels")

    def label_values(self) -> tuple[str, ...]:
        return tuple(label.value for label in self.labels)


@dataclass(frozen=True)
class PromptControl:
    """A control whose regions are prompts for interactive calls (smart tags, TextArea)."""

    name: str
    type: str
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ProjectConfig:
    """The parsed label config: one image object and the controls bound to it."""

    image_name: str
    image_value_key: str  # task.data key holding the image ("image" for value="$image")
    outputs: tuple[OutputControl, ...]
    prompt_controls: tuple[PromptControl, ...]
    thresholds: Mapping[str, float]  # box_threshold / text_threshold from <Number> tags
    # every output control in config order, model_skip="true" ones included: the backend
    # never predicts into those, but exports must still read their regions
    all_outputs: tuple[OutputControl, ...] = ()

    @property
    def skipped_outputs(self) -> tuple[OutputControl, ...]:
        return tuple(c for c in self.all_outputs if c not in self.outputs)

    def export_outputs(self) -> tuple[OutputControl, ...]:
        return self.all_outputs or self.outputs

    def export_label_values(self) -> tuple[str, ...]:
        """Every distinct label of every output control, config order."""
        return tuple(dict.fromkeys(label for c in self.export_outputs() for label in c.label_values()))

    def label_values(self) -> tuple[str, ...]:
        """Every distinct output label, in config order."""
        seen: dict[str, None] = {}
        for control in self.outputs:
            for label in control.labels:
                seen.setdefault(label.value, None)
        return tuple(seen)

    def prompts_by_label(self) -> dict[str, tuple[str, ...]]:
        """Label -> detector phrases, merged over all output controls (config order)."""
        merged: dict[str, tuple[str, ...]] = {}
        for control in self.outputs:
            for label in control.labels:
                merged.setdefault(label.value, label.prompts)
        return merged

    def stuff_labels(self) -> frozenset[str]:
        """Labels whose mode is ``stuff`` in any output control."""
        return frozenset(
            label.value for control in self.outputs for label in control.labels if label.mode == "stuff"
        )

    def with_prompts(self, label: str, prompts: tuple[str, ...]) -> ProjectConfig:
        """This config with ``label`` found by ``prompts`` in every output control: how an
        annotator's remembered free-text phrase replaces the config's prompts for its label."""

        def relabel(control: OutputControl) -> OutputControl:
            specs = tuple(replace(s, prompts=prompts) if s.value == label else s for s in control.labels)
            return replace(control, labels=specs)

        return replace(
            self,
            outputs=tuple(relabel(c) for c in self.outputs),
            all_outputs=tuple(relabel(c) for c in self.all_outputs),
        )

    def mask_outputs_for(self, label: str) -> tuple[OutputControl, ...]:
        """Mask controls (brush, bitmask, polygon) offering ``label``, config order."""
        return tuple(c for c in self.outputs if c.is_mask and label in c.label_values())


def split_prompt(text: str) -> tuple[str, ...]:
    """``"car . automobile"`` -> ``("car", "automobile")``; blank phrases dropped."""
    return tuple(part.strip() for part in text.split(".") if part.strip())


def _prompts_for(value: str, attrs: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[str, ...]:
    if value in overrides:
        override = overrides[value]
        if isinstance(override, str):
            phrases = split_prompt(override)
        elif isinstance(override, list | tuple) and all(isinstance(p, str) for p in override):
            phrases = tuple(p.strip() for p in override if p.strip())
        else:
            raise LabelConfigError(
                f"LABEL_PROMPTS entry for label {value!r} must be a string or a list of strings"
            )
        if phrases:
            return phrases
    predicted = attrs.get("predicted_values")
    if predicted and predicted.strip():
        phrases = tuple(p.strip() for p in predicted.split(",") if p.strip())
        if phrases:
            return phrases
    hint = attrs.get("hint")
    if hint and split_prompt(hint):
        return split_prompt(hint)
    # the label name is one phrase even with a "." in it ("St. Bernard"): only LABEL_PROMPTS and
    # hint use " . " between synonyms, the way GroundingDINO captions separate phrases
    return (value.strip(),)


def _mode_for(value: str, attrs: Mapping[str, Any], overrides: Mapping[str, Any]) -> str:
    raw = overrides[value] if value in overrides else attrs.get("mode") or "thing"
    mode = str(raw).strip().lower()
    if mode not in LABEL_MODES:
        source = "LABEL_MODES entry" if value in overrides else "mode attribute"
        raise LabelConfigError(f"{source} for label {value!r} is {raw!r}; use thing or stuff")
    return mode


def _truthy(raw: Any) -> bool:
    return str(raw).strip().lower() in {"true", "1", "yes"}


def _float_attr(control_name: str, attr: str, raw: Any) -> float | None:
    if raw is None or str(raw).strip() == "":
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise LabelConfigError(f"{attr}={raw!r} on control {control_name!r} is not a number") from exc


def _labels_partners(controls: Sequence[Any], image_names: set[str]) -> dict[str, Any]:
    """Image name -> the first ``<Labels>`` tag with ``<Label>`` values bound to it: where a bare
    tool on that image takes its labels from (Label Studio labels a region drawn with the tool
    with the label selected in that ``<Labels>``)."""
    partners: dict[str, Any] = {}
    for control in controls:
        if control.tag.lower() == "labels" and control.labels_attrs:
            for name in control.to_name or []:
                if name in image_names:
                    partners.setdefault(name, control)
    return partners


def _first_attr(name: str, *controls: Any) -> Any:
    """The first of ``controls`` that sets attribute ``name`` gives it: a bare tool's own
    ``model_skip`` / ``model_score_threshold`` win over those of its ``<Labels>``."""
    return next((c.attr[name] for c in controls if c is not None and name in (c.attr or {})), None)


def parse_label_config(
    xml: str, label_prompts: Mapping[str, Any] | None = None, label_modes: Mapping[str, Any] | None = None
) -> ProjectConfig:
    """Parse a label config into what the backend serves, or raise ``LabelConfigError``
    with a sentence Label Studio can show the user."""
    if not xml or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML/validation types
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from exc

    images = [obj for obj in interface.objects if obj.tag.lower() == "image"]
    if not images:
        raise LabelConfigError(
            "the label config has no <Image> tag; this backend segments images only"
        )
    image_names = {img.name for img in images}
    overrides = label_prompts or {}
    partners = _labels_partners(interface.controls, image_names)

    every_output: list[OutputControl] = []
    skipped_names: set[str] = set()
    prompt_controls: list[PromptControl] = []
    thresholds: dict[str, float] = {}
    for control in interface.controls:
        kind = control.tag.lower()
        to_name = next((n for n in control.to_name or [] if n in image_names), None)
        if to_name is None:
            continue
        if kind == "number" and control.name in {"box_threshold", "text_threshold"}:
            value = _float_attr(control.name, "defaultValue", control.attr.get("defaultValue"))
            if value is not None:
                thresholds[control.name] = value
            continue
        skipped = _truthy(control.attr.get("model_skip", "false"))
        label_tags = control.labels_attrs or {}
        if not skipped and kind in PROMPT_TYPES and (_truthy(control.attr.get("smart", "false")) or kind == "textarea"):
            prompt_controls.append(
                PromptControl(control.name, kind, to_name, tuple(label_tags))
            )
        partner = partners.get(to_name) if kind in SHAPE_TYPES else None
        if partner is not None:
            kind, label_tags = f"{kind}labels", partner.labels_attrs
            skipped = _truthy(_first_attr("model_skip", control, partner) or "false")
        if kind not in OUTPUT_TYPES:
            continue
        labels = tuple(
            LabelSpec(
                value,
                _prompts_for(value, tag.attr or {}, overrides),
                _mode_for(value, tag.attr or {}, label_modes or {}),
            )
            for value, tag in label_tags.items()
        )
        if not labels:
            continue
        every_output.append(
            OutputControl(
                name=control.name,
                type=kind,
                to_name=to_name,
                labels=labels,
                score_threshold=_float_attr(
                    control.name, "model_score_threshold", _first_attr("model_score_threshold", control, partner)
                ),
                labels_name=partner.name if partner is not None else None,
            )
        )
        if skipped:
            skipped_names.add(control.name)

    outputs = [c for c in every_output if c.name not in skipped_names]

    if not outputs:
        raise LabelConfigError(
            "the label config has no <BrushLabels>, <BitmaskLabels>, <PolygonLabels> or "
            "<RectangleLabels> with <Label> values bound to an <Image>, nor a <Brush>, <Bitmask>, "
            "<Polygon> or <Rectangle> tag next to a <Labels> tag with <Label> values on that image; "
            "add one so the backend knows what to find and where to put the masks"
        )
    image_name = outputs[0].to_name
    image = next(img for img in images if img.name == image_name)
    value = (image.value or "").lstrip("$")
    if not value:
        raise LabelConfigError(f"the <Image name={image_name!r}> tag has no value=\"$...\" attribute")
    return ProjectConfig(
        image_name=image_name,
        image_value_key=value,
        outputs=tuple(c for c in outputs if c.to_name == image_name),
        all_outputs=tuple(c for c in every_output if c.to_name == image_name),
        prompt_controls=tuple(c for c in prompt_controls if c.to_name == image_name),
        thresholds=thresholds,
    )
