"""The HTTP front's checks (parakeet_triton.front), without a server: what it refuses and what it lets through."""

from __future__ import annotations

import json

import pytest

from parakeet_triton.front import MAX_JSON_DEPTH, Refused, check_infer_request, default_max_request_bytes, parse_json


def _request(**entry):
    base = {"name": "WAV", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}
    base.update(entry)
    return {"inputs": [base]}


def test_a_valid_request_passes():
    check_infer_request(_request(), 0)
    check_infer_request(_request(data=[[0.1, 0.2, 0.3]]), 0)
    binary = _request(parameters={"binary_data_size": 12})
    del binary["inputs"][0]["data"]
    check_infer_request(binary, 12)


@pytest.mark.parametrize("entry,binary,words", [
    ({"shape": [1, 1 << 40], "data": []}, 0, "holds 1099511627776 elements but 'data' has 0"),
    ({"shape": [1, -1]}, 0, "'shape' must be"),
    ({"shape": [1, True, 3]}, 0, "'shape' must be"),
    ({"datatype": "FP99"}, 0, "unknown datatype"),
    ({"data": [[[0.1, 0.2, 0.3]]]}, 0, "nested deeper than its shape"),
    ({"data": [{"a": 1}]}, 0, "holds an object"),
    ({"name": ""}, 0, "needs a 'name'"),
    ({"data": None, "parameters": {"binary_data_size": 12}}, 12, "both 'data' and 'binary_data_size'"),
])
def test_inconsistent_inputs_are_refused_with_the_reason(entry, binary, words):
    with pytest.raises(Refused, match=words.replace("(", r"\(").replace("[", r"\[")) as refused:
        check_infer_request(_request(**entry), binary)
    assert refused.value.status == 400


def test_binary_sizes_must_match_shape_and_body():
    request = _request(shape=[1, 1 << 40], parameters={"binary_data_size": 16})
    del request["inputs"][0]["data"]
    with pytest.raises(Refused, match="needs 4398046511104 bytes"):
        check_infer_request(request, 16)
    request = _request(parameters={"binary_data_size": 12})
    del request["inputs"][0]["data"]
    with pytest.raises(Refused, match="add up to 12 bytes but the body carries 20"):
        check_infer_request(request, 20)


def test_json_nesting_is_bounded_before_parsing():
    assert parse_json(json.dumps([[1]] * 3).encode()) == [[1]] * 3
    nested = ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode()
    assert parse_json(nested) is not None
    for text in (b"[" * 1_000_000, b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)):
        with pytest.raises(Refused, match="nested more than"):
            parse_json(text)
    with pytest.raises(Refused, match="not valid JSON"):
        parse_json(b'{"inputs": [')
    with pytest.raises(Refused, match="empty"):
        parse_json(b"")


def test_default_body_limit_fits_the_longest_clip():
    three_hours = 10800 * 16000 * 4
    assert three_hours < default_max_request_bytes(10800) <= three_hours + (64 << 20)
