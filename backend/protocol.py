"""Request bodies of the Label Studio ML backend protocol (see shared/ls-protocol.md).

Only what the backend reads is validated; everything else Label Studio sends (annotations,
drafts, predictions of interactive calls, which can reach megabytes) passes through
untouched as ``extra`` fields, so parsing cost does not grow with it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["PredictRequest", "SetupRequest", "ValidationError", "WebhookEvent", "describe_validation_error"]


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
    def _empty_extra_params(cls, value: Any) -> Any:
        # Label Studio sends "" or null when the connection form's extra params are empty.
        return None if value in ("", None) else value


class WebhookEvent(_Lenient):
    action: str = Field(min_length=1, max_length=128)  # it is echoed and kept: bound it


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
