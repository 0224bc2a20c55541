"""Responses are written by orjson and read back as the standard library would write them."""

from __future__ import annotations

import json

import numpy as np
from flask import Flask

from backend.fast_json import OrjsonProvider


def test_orjson_responses_parse_to_the_same_values_as_the_standard_encoder() -> None:
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    payload = {"results": [{"result": [{"rle": list(range(300)), "score": 0.123456789}], "label": "café ☕"}]}
    with app.app_context():
        response = app.json.response(payload)
        assert response.mimetype == "application/json"
        assert json.loads(response.get_data()) == json.loads(json.dumps(payload))
        # numpy scalars and arrays (should one slip into an answer) and int keys do not break it
        odd = json.loads(app.json.response({1: np.int64(7), "a": np.arange(3)}).get_data())
        assert odd == {"1": 7, "a": [0, 1, 2]}
        assert json.loads(app.json.dumps(payload)) == payload


def test_integers_beyond_64_bits_fall_back_to_the_standard_encoder() -> None:
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    with app.app_context():
        assert json.loads(app.json.response({"n": 10**30}).get_data()) == {"n": 10**30}
        assert json.loads(app.json.dumps([10**30])) == [10**30]
