"""Who may use the proxy: client API keys for the API, an admin token for /admin/*.

A raw ASGI middleware, so the check is in one place and costs nothing when no key is set.
Keys are compared in constant time (`hmac.compare_digest`, against every key, with no
early exit), and neither keys nor the Authorization header are ever logged.

- everything but /admin* and the open paths: when client keys are configured,
  `Authorization: Bearer <key>` must carry one of them (the openai SDK's `api_key`); else
  401 in the OpenAI shape. Default deny, so no spelling of a path slips through.
- /admin/*: the admin token when one is configured; without one, loopback clients only
  (403 for anyone else), so a proxy listening on a public address is not reconfigurable
  by strangers.
- /healthz, /stats, /verdict, /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.config import Auth
from proxy.errors import AuthenticationError, ConfigError, ForbiddenError

OPEN_PATHS = frozenset({"/healthz", "/metrics", "/stats", "/verdict"})  # for probes and scrapers


@dataclass(frozen=True)
class Keys:
    client: tuple[bytes, ...]  # empty: the API is open
    admin: bytes | None

    def __repr__(self) -> str:  # never print a key by accident
        return f"Keys(client={len(self.client)} keys, admin={'set' if self.admin else 'unset'})"


def resolve_keys(auth: Auth, environ: Mapping[str, str] = os.environ) -> Keys:
    """The keys in effect; a named environment variable that is unset is a config error
    (silently running without the keys the operator meant to set would open the API)."""
    for key, name in (
        ("api_keys_env", auth.api_keys_env),
        ("admin_token_env", auth.admin_token_env),
    ):
        if name is not None and not environ.get(name, "").strip():
            raise ConfigError(f"auth.{key}: environment variable {name} is not set or empty")
    keys = [key.get_secret_value().strip() for key in auth.api_keys]
    if auth.api_keys_env is not None:
        keys += [key.strip() for key in environ[auth.api_keys_env].split(",") if key.strip()]
    admin = None
    if auth.admin_token is not None:  # the file's token first, as for the keys
        admin = auth.admin_token.get_secret_value()
    elif auth.admin_token_env is not None:
        admin = environ[auth.admin_token_env]
    return Keys(
        tuple(key.encode() for key in keys), admin.strip().encode() if admin is not None else None
    )


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def matches(given: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant time in the keys' content: every key is compared, whatever matched."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given or b"", key)
    return found and bool(given)  # an empty key is never one


def check(scope: Mapping[str, Any], keys: Keys) -> None:
    """Raise the `ProxyError` a request to this path gets, or return if it may pass."""
    path: str = scope["path"]
    if path.startswith("/admin"):
        _check_admin(scope, keys)
    elif (
        keys.client
        and path not in OPEN_PATHS  # default deny: no path spelling slips through
        and not matches(bearer(scope["headers"]), keys.client)
    ):
        raise AuthenticationError(
            "Incorrect or missing API key: send `Authorization: Bearer <key>`"
        )


def _check_admin(scope: Mapping[str, Any], keys: Keys) -> None:
    if keys.admin is not None:
        if not matches(bearer(scope["headers"]), (keys.admin,)):
            raise AuthenticationError("admin endpoints need `Authorization: Bearer <admin token>`")
    elif not is_loopback((scope.get("client") or ("",))[0]):
        raise ForbiddenError("admin endpoints are loopback-only unless auth.admin_token is set")


def is_loopback(host: str) -> bool:
    """Whether an address (or "localhost") is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # no address (a Unix socket) or a name: not known to be local
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
