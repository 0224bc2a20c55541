"""JSON responses through orjson.

Why: a click's answer is one brush RLE of a few hundred thousand integers for a ragged mask
(a batch answer holds many), and the standard library's encoder spent 16-50 ms of a ~100 ms
click writing it (bench/NOTES.md); orjson writes the same JSON text in about a tenth of that.
Requests are still parsed by Flask's standard decoder: its error behaviour (depth limit,
NaN, big integers) is what the endpoints' 4xx messages and the fuzz tests are built on.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from flask import Response
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON provider with orjson's encoder (``app.json = OrjsonProvider(app)``);
    decoding stays the default's."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return _encode(obj, **kwargs).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(_encode(obj), mimetype=self.mimetype)


def _encode(obj: Any, **kwargs: Any) -> bytes:
    """orjson's bytes; what orjson refuses (integers beyond 64 bits, e.g. echoed from a fuzzed
    request) falls back to the standard encoder, which writes any Python int."""
    try:
        return orjson.dumps(obj, option=_OPTIONS)
    except TypeError:
        return json.dumps(obj, **kwargs).encode()
