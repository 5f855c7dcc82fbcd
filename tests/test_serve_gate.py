"""The request gate: one upload (raw, multipart, JSON) -> image bytes and validated parameters."""

from __future__ import annotations

import asyncio
import json

import pytest

from detectkit.serve.gate import RequestError, canonical_request


def _multipart(fields: dict[str, str], image: bytes) -> tuple[str, bytes]:
    b = "dkboundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return f"multipart/form-data; boundary={b}", b"".join(parts) + f"--{b}--\r\n".encode()


def test_query_parameters_hold_for_every_body_type():
    """``?conf=0.001`` with a multipart upload or a JSON body was silently dropped (conf 0.25 used)."""
    ctype, body = _multipart({}, b"IMG")
    image, params = asyncio.run(canonical_request(ctype, body, "conf=0.001&max_det=5"))
    assert image == b"IMG" and params == {"conf": 0.001, "max_det": 5}
    raw = json.dumps({"image": "SU1H"}).encode()  # base64 of b"IMG"
    assert asyncio.run(canonical_request("application/json", raw, "conf=0.2"))[1] == {"conf": 0.2}
    assert asyncio.run(canonical_request("image/jpeg", b"IMG", "conf=0.3"))[1] == {"conf": 0.3}


def test_a_body_field_wins_over_the_query_and_unknown_query_fields_are_refused():
    ctype, body = _multipart({"conf": "0.5"}, b"IMG")
    assert asyncio.run(canonical_request(ctype, body, "conf=0.1"))[1] == {"conf": 0.5}
    with pytest.raises(RequestError, match="unknown form field"):
        asyncio.run(canonical_request(ctype, body, "confidence=0.1"))


def test_an_upload_that_is_no_image_is_a_400_without_internal_details():
    from detectkit.serve.preprocess import decode_upload

    for junk in (b"not an image", bytes(range(256)) * 40):
        with pytest.raises(RequestError) as e:
            decode_upload(junk)
        assert e.value.status == 400
        assert str(e.value).startswith("not a readable image") and "0x" not in str(e.value) and "BytesIO" not in str(e.value)
