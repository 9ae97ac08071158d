"""Bearer tokens and the authorization matrix: which role may call which route, in one place."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from dtfd.config import MIN_TOKEN_CHARS, ConfigError, read_strict

ROLES = ("admin", "worker", "reader")
READ = frozenset(ROLES)
ADMIN = frozenset({"admin"})


class Token(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    role: str
    token: str


class TokensFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tokens: tuple[Token, ...] = ()


class Tokens:
    """Looks tokens up by their SHA-256, so comparison time does not leak their bytes."""

    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self._by_digest = {hashlib.sha256(t.token.encode()).digest(): t for t in tokens}

    def identify(self, authorization: str) -> Token | None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return None
        return self._by_digest.get(hashlib.sha256(value.strip().encode()).digest())


def load_tokens(path: str | Path) -> Tokens:
    parsed = read_strict(path, TokensFile)
    for n, token in enumerate(parsed.tokens):
        if token.role not in ROLES:
            raise ConfigError(f"{path}: tokens[{n}].role: {token.role!r} is not one of {', '.join(ROLES)}")
        if len(token.token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{path}: tokens[{n}].token: must be at least {MIN_TOKEN_CHARS} characters")
    return Tokens(parsed.tokens)
