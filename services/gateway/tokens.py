"""Signed, expiring tracking tokens: the proof that an event belongs to a slot the gateway served.

An event is billed and counted only if its token verifies, so the token, not the client, says
which ad, campaign, user, scene and click price an event is about. A client can neither invent an
impression nor change its price.

Format (compact, URL-safe, no pickle): `<blob>.<tag>`, both base64url without padding.

Version 2 (what `sign` writes) is encrypted, so the page that shows an ad cannot read the click
price or the user id out of its token: `blob` = `0x02 || nonce(16) || ciphertext`, where the
plaintext is the JSON array `[2, request_id, ad_id, campaign_id, user_id, scene, price_micros,
category_id, position, expires_at]` XORed with a keystream of HMAC-SHA256(enc_key, nonce ||
counter) blocks (HMAC as a PRF in counter mode: the standard library has no AES), and `tag` =
HMAC-SHA256(mac_key, "cascade-token.v2." || blob): encrypt-then-MAC. Both keys are derived from
`CASCADE_TOKEN_SECRET` (HMAC with distinct labels), so one secret still configures everything.

Version 1 (`<payload>.<signature>`, a readable base64 JSON payload signed with HMAC-SHA256 over
`b"cascade-token." + payload`) is still verified, so tokens handed out before an upgrade keep
their events; it is never written any more.

Verification checks the tag (constant time) BEFORE it decrypts or parses anything, then the
shape, then the expiry.

The token's lifetime is the attribution window: a conversion after it expires is rejected, so
pick `ttl_s` to cover the longest click-to-conversion delay you want to credit (default a day).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

import orjson

from services.common.config import Settings
from services.common.events import TokenClaims

__all__ = [
    "ExpiredToken", "ForgedToken", "MalformedToken", "TokenClaims", "TokenError", "TokenSigner",
]

TOKEN_VERSION = 2
DEFAULT_TTL_S = 86_400
MAX_TOKEN_CHARS = 2048  # refuse to hash or parse anything longer
_DOMAIN = b"cascade-token."
_DOMAIN_V2 = b"cascade-token.v2."
_V2 = b"\x02"
_NONCE_BYTES = 16


class TokenError(ValueError):
    """A tracking token that must not be accepted; the message says why (one line)."""


class MalformedToken(TokenError):
    """Not a token at all: wrong shape, bad encoding, wrong fields."""


class ForgedToken(TokenError):
    """The signature does not match: altered, or signed with another secret."""


class ExpiredToken(TokenError):
    """Genuine, but past its expiry."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TokenSigner:
    """Signs and verifies tracking tokens with one secret (plus older ones during a rotation)."""

    def __init__(self, secret: str | bytes, ttl_s: int = DEFAULT_TTL_S,
                 previous_secrets: tuple[str | bytes, ...] = ()) -> None:
        keys = [secret, *previous_secrets]
        self._keys = [k.encode() if isinstance(k, str) else bytes(k) for k in keys]
        if any(len(k) < 16 for k in self._keys):
            raise ValueError("CASCADE_TOKEN_SECRET must be at least 16 bytes")
        # (encryption key, MAC key) per secret, derived with distinct labels
        self._v2_keys = [(hmac.new(k, b"cascade-token-enc", hashlib.sha256).digest(),
                          hmac.new(k, b"cascade-token-mac", hashlib.sha256).digest())
                         for k in self._keys]
        if ttl_s <= 0:
            raise ValueError(f"token ttl must be > 0 seconds (got {ttl_s})")
        self.ttl_s = int(ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings, ttl_s: int = DEFAULT_TTL_S) -> TokenSigner:
        """The configured secret; with auth explicitly off (demo) a random per-process secret.

        A random secret means tokens do not survive a restart and do not verify across gateway
        replicas, which is acceptable only for the single-process demo.
        """
        if settings.token_secret:
            return cls(settings.token_secret, ttl_s)
        if not settings.auth:
            return cls(secrets.token_bytes(32), ttl_s)
        raise ValueError("CASCADE_TOKEN_SECRET is not set (required unless CASCADE_AUTH=off)")

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, _DOMAIN + payload, hashlib.sha256).digest()

    def sign(self, *, request_id: str, ad_id: int, campaign_id: int, user_id: str | int,
             scene: str, price_micros: int, category_id: int, position: int,
             now: float) -> str:
        """A token for one served slot, valid until `now + ttl_s` (Unix seconds)."""
        claims = TokenClaims(str(request_id), int(ad_id), int(campaign_id), str(user_id),
                             str(scene), int(price_micros), int(category_id), int(position),
                             int(now) + self.ttl_s)
        return self.sign_claims(claims)

    def sign_claims(self, claims: TokenClaims) -> str:
        body = [TOKEN_VERSION, claims.request_id, claims.ad_id, claims.campaign_id,
                claims.user_id, claims.scene, claims.price_micros, claims.category_id,
                claims.position, claims.expires_at]
        enc_key, mac_key = self._v2_keys[0]
        nonce = secrets.token_bytes(_NONCE_BYTES)
        plain = orjson.dumps(body)
        blob = _V2 + nonce + _xor_keystream(enc_key, nonce, plain)
        blob_text = _b64encode(blob).encode("ascii")
        tag = hmac.new(mac_key, _DOMAIN_V2 + blob_text, hashlib.sha256).digest()
        return blob_text.decode("ascii") + "." + _b64encode(tag)

    def verify(self, token: str, now: float) -> TokenClaims:
        """The claims of a genuine, unexpired token; else `MalformedToken` / `ForgedToken` /
        `ExpiredToken` (all `TokenError`, a `ValueError`)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise MalformedToken("tracking token is empty, too long or not a string")
        payload_text, dot, signature_text = token.partition(".")
        if not dot or not payload_text or not signature_text or "." in signature_text:
            raise MalformedToken("tracking token must be '<payload>.<signature>'")
        try:
            payload = payload_text.encode("ascii")
            signature = _b64decode(signature_text)
            first = _b64decode(payload_text[:4])[:1]
        except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
            raise MalformedToken("tracking token is not base64url") from exc
        if first == _V2:
            claims = self._open_v2(payload, signature)
        else:
            if not any(hmac.compare_digest(self._mac(k, payload), signature)
                       for k in self._keys):
                raise ForgedToken("tracking token signature does not match (forged or altered)")
            claims = _parse_payload(orjson_loads(payload), 1)
        if now >= claims.expires_at:
            raise ExpiredToken(f"tracking token expired at {claims.expires_at} (now {int(now)})")
        return claims


    def _open_v2(self, blob_text: bytes, tag: bytes) -> TokenClaims:
        """Check the tag under each secret (constant time), then decrypt and parse."""
        matched = [enc for enc, mac in self._v2_keys if hmac.compare_digest(
            hmac.new(mac, _DOMAIN_V2 + blob_text, hashlib.sha256).digest(), tag)]
        if not matched:
            raise ForgedToken("tracking token signature does not match (forged or altered)")
        blob = _b64decode(blob_text.decode("ascii"))
        nonce, cipher = blob[1:1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES:]
        plain = _xor_keystream(matched[0], nonce, cipher)
        try:
            body = orjson.loads(plain)
        except orjson.JSONDecodeError as exc:
            raise MalformedToken("tracking token payload is not JSON") from exc
        return _parse_payload(body, 2)


def _xor_keystream(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """`data` XOR HMAC-SHA256(key, nonce || counter) blocks: a PRF in counter mode (its own
    inverse, so it both encrypts and decrypts)."""
    if not data:
        return b""
    stream = b"".join(hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
                      for i in range(-(-len(data) // 32)))[:len(data)]
    mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(data), "big")


def orjson_loads(payload: bytes) -> object:
    """A version-1 payload (base64url JSON) whose signature already matched."""
    try:
        return orjson.loads(_b64decode(payload.decode("ascii")))
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise MalformedToken("tracking token payload is not JSON") from exc


def _parse_payload(body: object, version: int) -> TokenClaims:
    """Shape checks on a payload whose tag already matched (so errors here mean a bug or a
    token from an incompatible version, never an attacker's bytes)."""
    if not isinstance(body, list) or len(body) != 10 or body[0] != version:
        raise MalformedToken(f"tracking token is not a version-{version} token")
    _, request_id, ad_id, campaign_id, user_id, scene, price, category_id, position, exp = body
    if not all(isinstance(v, str) for v in (request_id, user_id, scene)):
        raise MalformedToken("tracking token has a non-string id or scene")
    if not all(_is_int(v) for v in (ad_id, campaign_id, price, category_id, position, exp)):
        raise MalformedToken("tracking token has a non-integer id, price or expiry")
    if price < 0 or position < 0:
        raise MalformedToken("tracking token has a negative price or position")
    return TokenClaims(request_id, ad_id, campaign_id, user_id, scene, price, category_id,
                       position, exp)

