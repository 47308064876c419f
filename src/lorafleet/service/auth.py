"""Tenants and API tokens.

A token is ``lft_`` followed by 32 random bytes (URL-safe base64). The store keeps only its SHA-256: tokens
are random, not passwords, so a fast unsalted hash is as safe as a slow one (no dictionary to try) and lets
the API find the tenant with one indexed look-up. The secret is printed once, by
``lorafleet tokens create --tenant NAME --data-dir DIR``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from .store import Store, TokenRecord

__all__ = ["TENANT_PATTERN", "AuthError", "authenticate", "create_token", "hash_token", "validate_tenant"]

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TENANT_RE = re.compile(TENANT_PATTERN)
_TOKEN_PREFIX = "lft_"


class AuthError(Exception):
    """A request without a valid token; ``str(e)`` says what was wrong and how to fix it."""


def validate_tenant(name: str) -> str:
    """Return ``name`` if it is a valid tenant name, else raise ValueError with the rule."""
    if not _TENANT_RE.match(name):
        raise ValueError(
            f"tenant {name!r} is not a valid name: use 1 to 63 characters, lower-case letters, digits, '-' "
            "and '_', starting with a letter or digit"
        )
    return name


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(store: Store, tenant: str) -> tuple[TokenRecord, str]:
    """Create a token for ``tenant`` (a new tenant is created by its first token); returns (record, secret)."""
    validate_tenant(tenant)
    secret = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    rec = TokenRecord(
        id="tok-" + secrets.token_hex(8), tenant=tenant, token_hash=hash_token(secret), created_at=time.time()
    )
    store.add_token(rec)
    return rec, secret


def authenticate(store: Store, authorization: str | None) -> str:
    """The tenant named by an ``Authorization: Bearer TOKEN`` header value; raises AuthError."""
    how = "send 'Authorization: Bearer TOKEN' (create a token with `lorafleet tokens create --tenant NAME`)"
    if not authorization:
        raise AuthError(f"missing API token: {how}")
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise AuthError(f"malformed Authorization header: {how}")
    tenant = store.tenant_for_token_hash(hash_token(secret))
    if tenant is None:
        raise AuthError("invalid or revoked API token: check the token, or create a new one")
    return tenant
