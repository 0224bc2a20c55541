"""Request bodies of the Label Studio ML backend protocol (see shared/ls-protocol.md).

Only what the backend reads is validated; everything else Label Studio sends (annotations,
drafts, predictions of interactive calls, which can reach megabytes) passes through
untouched as ``extra`` fields, so parsing cost does not grow with it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "PredictRequest",
    "SetupRequest",
    "ValidationError",
    "WebhookEvent",
    "describe_validation_error",
    "parse_extra_params",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Task(_Lenient):
    """A task as Label Studio sends it; ``data`` holds the image reference."""

    id: int | str | None = None
    data: dict[str, Any]


class PredictParams(_Lenient):
    context: dict[str, Any] | None = None


class PredictRequest(_Lenient):
    tasks: list[Task] = Field(min_length=1)
    label_config: str | None = None
    project: str | int | None = None
    params: PredictParams | None = None

    @property
    def context(self) -> dict[str, Any] | None:
        return self.params.context if self.params else None


class SetupRequest(_Lenient):
    schema_: str = Field(alias="schema", min_length=1)
    project: str | int | None = None
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | None = None

    @field_validator("extra_params", mode="before")
    @classmethod
    def _extra_params_text(cls, value: Any) -> dict[str, Any] | None:
        return parse_extra_params(value)


class WebhookEvent(_Lenient):
    action: str = Field(min_length=1, max_length=128)  # it is echoed and kept: bound it


def parse_extra_params(value: Any) -> dict[str, Any] | None:
    """A connection's extra params as a dict, or None when there are none.

    Label Studio's connection form (1.23.2) has a free-text box for them and ``/setup``
    receives what the user typed as a JSON *string*; ``""``, whitespace, null and the text
    ``null`` mean none. A JSON object may also arrive already parsed (API clients). Anything
    else raises ``ValueError`` (a 400 through pydantic) rather than being ignored: ignoring it
    would silently run another prediction mode than the user asked for.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"extra params must be a JSON object such as {_EXAMPLE}, not {_clip(text)}") from exc
    if value is None:
        return None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise ValueError(f"extra params must be a JSON object such as {_EXAMPLE}, not a JSON {kind}")
    return value


_EXAMPLE = '{"prediction_mode": "everything"}'
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _clip(text: str, limit: int = 80) -> str:
    """``text`` quoted and cut to ``limit`` characters: it is echoed in the error and logs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def project_id(project: str | int | None) -> str | None:
    """Label Studio sends ``"<id>.<created_at>"``; state is kept per project id."""
    if project is None:
        return None
    return str(project).split(".", 1)[0] or None


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per problem, e.g. ``tasks.0.data: Field required``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
