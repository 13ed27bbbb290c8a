"""The `session` of a request line: a keyed hash of its sticky header's value.

The statistics treat the requests of one session as one unit (see sequential.py), so the
log must say which requests belong together, without saying what the client sent: a
session id can be a user id. The line carries BLAKE2b keyed with a secret (BLAKE2's own
keyed mode, its HMAC), 8 bytes as 16 hex digits. Unkeyed, anyone could hash a list of
likely ids and read them back out of the log; keyed, only the holder of the key can.

The key, in order:
- `logging.session_key_env`: the environment variable of that name (1 to 64 bytes; unset
  or empty is a config error, as for the auth keys);
- else `session.key` beside the log file: 32 random bytes written on the first start
  (mode 0600) and read on every later one, so a session keeps its hash across restarts;
- else (no log file) random bytes per process: sessions match within one run only.
Proxies writing one experiment's logs must share the key (the same variable, or the same
file), or one session gets a different hash in each proxy's lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from proxy.config import Logging
from proxy.errors import ConfigError

KEY_FILE = "session.key"
KEY_BYTES = 32
DIGEST_BYTES = 8  # 16 hex digits: no two of a billion sessions alike, by 1 in 30,000


class SessionHasher:
    """`hasher(value) -> "0123456789abcdef"`: the session of a sticky header's value."""

    def __init__(self, key: bytes | None = None):
        key = secrets.token_bytes(KEY_BYTES) if key is None else key  # None: this process's
        # Keyed once: each call copies the keyed state, cheaper than keying again (the
        # key is a whole block of input to BLAKE2b).
        self._keyed = hashlib.blake2b(key=key, digest_size=DIGEST_BYTES)

    def __call__(self, value: str) -> str:
        digest = self._keyed.copy()
        digest.update(value.encode("utf-8"))
        return digest.hexdigest()

    def __repr__(self) -> str:  # never print the key by accident
        return "SessionHasher(key=...)"


def session_key_from_env(logging: Logging, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The key `logging.session_key_env` names, if it names one; a `ConfigError` if that
    variable is unset, empty or too long (a key the operator meant to share, silently
    replaced by another, would split every session in two)."""
    name = logging.session_key_env
    if name is None:
        return None
    key = environ.get(name, "").strip().encode("utf-8")
    if not key:
        raise ConfigError(
            f"logging.session_key_env: environment variable {name} is not set or empty"
        )
    if len(key) > hashlib.blake2b.MAX_KEY_SIZE:
        raise ConfigError(
            f"logging.session_key_env: environment variable {name} holds {len(key)} bytes;"
            f" a session key is at most {hashlib.blake2b.MAX_KEY_SIZE}"
            " (`openssl rand -hex 32` makes one)"
        )
    return key


def session_key(logging: Logging, environ: Mapping[str, str] = os.environ) -> bytes:
    """The key in effect for this config, at start: see the module's docstring."""
    key = session_key_from_env(logging, environ)
    if key is not None:
        return key
    if logging.path is None:
        return secrets.token_bytes(KEY_BYTES)
    return _key_file(logging.path.parent / KEY_FILE)


def _key_file(path: Path) -> bytes:
    """Read the key file, or create it: written whole under another name and linked into
    place, so two proxies starting together agree on one key and never read half of it."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _create(path)
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"logging: cannot use the session key {path}: {exc.strerror}") from None
    if not 16 <= len(key) <= hashlib.blake2b.MAX_KEY_SIZE:
        raise ConfigError(
            f"logging: {path} is not a session key ({len(key)} bytes, not 16 to 64);"
            " remove it to have a new one made (sessions then get new hashes)"
        )
    return key


def _create(path: Path) -> None:
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(KEY_BYTES))
        with contextlib.suppress(FileExistsError):  # another proxy made it first: theirs
            os.link(draft, path)
    finally:
        draft.unlink()
