"""Tracking tokens: a genuine token round-trips; forged, altered, expired and junk ones fail."""

from __future__ import annotations

import base64
import re

import orjson
import pytest

from services.common.config import Settings
from services.gateway.tokens import (
    ExpiredToken,
    ForgedToken,
    MalformedToken,
    TokenClaims,
    TokenError,
    TokenSigner,
)

SECRET = "s3cret-for-tests-0123456789"
NOW = 1_750_000_000.0


def make_token(signer: TokenSigner, **overrides: object) -> str:
    args: dict[str, object] = dict(request_id="req-1", ad_id=123456789012, campaign_id=77,
                                   user_id="u-42", scene="home_feed", price_micros=1_234_567,
                                   category_id=301, position=2, now=NOW)
    args.update(overrides)
    return signer.sign(**args)  # type: ignore[arg-type]


def test_round_trip_carries_every_claim() -> None:
    signer = TokenSigner(SECRET, ttl_s=600)
    token = make_token(signer)
    assert re.fullmatch(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+", token)  # URL-safe, no padding
    assert len(token) < 200
    claims = signer.verify(token, now=NOW + 599)
    assert claims == TokenClaims("req-1", 123456789012, 77, "u-42", "home_feed", 1_234_567, 301,
                                 2, int(NOW) + 600)


def test_numeric_user_id_is_carried_as_a_string() -> None:
    signer = TokenSigner(SECRET)
    assert signer.verify(make_token(signer, user_id=9001), NOW).user_id == "9001"


def test_expired_token_is_rejected_at_expiry() -> None:
    signer = TokenSigner(SECRET, ttl_s=60)
    token = make_token(signer)
    with pytest.raises(ExpiredToken, match="expired"):
        signer.verify(token, now=NOW + 60)


def test_token_signed_with_another_secret_is_forged() -> None:
    other = TokenSigner("another-secret-0123456789")
    with pytest.raises(ForgedToken, match="signature"):
        TokenSigner(SECRET).verify(make_token(other), NOW)


def _v1_token(signer: TokenSigner, body: list) -> str:
    """A version-1 token (readable payload) as gateways before version 2 signed them."""
    payload = base64.urlsafe_b64encode(orjson.dumps(body)).rstrip(b"=")
    mac = signer._mac(signer._keys[0], payload)  # noqa: SLF001 - the old format, by hand
    return payload.decode() + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_altered_ciphertext_is_forged() -> None:
    signer = TokenSigner(SECRET)
    blob, tag = make_token(signer).split(".")
    raw = bytearray(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    raw[-3] ^= 0x01  # flip one bit of the encrypted price or expiry
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(ForgedToken):
        signer.verify(f"{tampered}.{tag}", NOW)


def test_token_does_not_reveal_price_or_user_id() -> None:
    """Finding 8: the claims are encrypted, not base64 JSON a page script can read."""
    signer = TokenSigner(SECRET)
    first, second = make_token(signer), make_token(signer)
    assert first != second  # a fresh nonce per token: equal claims do not link
    for token in (first, second):
        blob = token.split(".")[0]
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        for secret_claim in (b"1234567", b"u-42", b"home_feed", b"req-1"):
            assert secret_claim not in raw and secret_claim.decode() not in token
        assert signer.verify(token, NOW).price_micros == 1_234_567


def test_version_1_tokens_still_verify_and_their_tampering_is_forged() -> None:
    signer = TokenSigner(SECRET)
    body = [1, "req-1", 5, 77, "u-42", "home_feed", 1_000, 301, 0, int(NOW) + 60]
    assert signer.verify(_v1_token(signer, body), NOW).price_micros == 1_000
    payload, signature = _v1_token(signer, body).split(".")
    tampered = base64.urlsafe_b64encode(orjson.dumps([*body[:6], 1, *body[7:]])).rstrip(b"=")
    with pytest.raises(ForgedToken):
        signer.verify(f"{tampered.decode()}.{signature}", NOW)


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", ".sig", "payload.", "é.é",
                                  "x" * 5000, "!!!.???"])
def test_malformed_tokens_raise_a_clear_error(junk: str) -> None:
    with pytest.raises(TokenError) as info:
        TokenSigner(SECRET).verify(junk, NOW)
    assert isinstance(info.value, MalformedToken | ForgedToken)
    assert str(info.value).startswith("tracking token")


def test_correctly_signed_but_wrong_shape_is_malformed() -> None:
    signer = TokenSigner(SECRET)
    token = _v1_token(signer, [1, "r", "not-an-int"])  # simulate a buggy signer
    with pytest.raises(MalformedToken, match="version-1"):
        signer.verify(token, NOW)


def test_rotation_accepts_tokens_from_the_previous_secret() -> None:
    old = TokenSigner("old-secret-0123456789")
    new = TokenSigner("new-secret-0123456789", previous_secrets=("old-secret-0123456789",))
    assert new.verify(make_token(old), NOW).ad_id == 123456789012
    with pytest.raises(ForgedToken):
        old.verify(make_token(new), NOW)


def test_from_settings_requires_a_secret_unless_auth_is_off() -> None:
    with pytest.raises(ValueError, match="CASCADE_TOKEN_SECRET"):
        TokenSigner.from_settings(Settings(auth=True))
    demo = TokenSigner.from_settings(Settings(auth=False))
    assert demo.verify(make_token(demo), NOW).scene == "home_feed"
    with pytest.raises(ValueError, match="16 bytes"):
        TokenSigner("short")
