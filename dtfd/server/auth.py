"""Bearer tokens, the authorization matrix (which role may call which route) and limits on guessing."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from dtfd.config import MIN_TOKEN_CHARS, ConfigError, read_strict
from dtfd.scheduler.shedding import RateLimiter

ROLES = ("admin", "worker", "reader")
READ = frozenset(ROLES)
ADMIN = frozenset({"admin"})
FAILURE_BURST = 20.0  # failed authentications one address, or one token prefix, may make at once ...
FAILURES_PER_S = 1.0  # ... and per second after that, before getting 429
PREFIX_CHARS = 8  # wrong tokens that start alike count as guesses at one token
TRACKED = 10_000  # addresses and prefixes remembered at most (memory stays bounded)


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


class Failures:
    """Failed authentications, limited per source address and per presented token prefix.

    Per address slows one host guessing any token; per prefix slows many hosts guessing at
    one token whose start they know. A token that is valid is identified before either
    limit is asked, so guessing can never lock the holder of a real token out.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.by_address = RateLimiter(FAILURES_PER_S, FAILURE_BURST, clock, max_clients=TRACKED)
        self.by_prefix = RateLimiter(FAILURES_PER_S, FAILURE_BURST, clock, max_clients=TRACKED)

    def refusal(self, address: str, authorization: str) -> tuple[float, str]:
        """Count one failure; (seconds to wait, which limit) once past a limit, else (0, "")."""
        prefix = authorization.partition(" ")[2].strip()[:PREFIX_CHARS]
        waits = [
            (self.by_address.retry_after(address), "from this address"),
            (self.by_prefix.retry_after(prefix), "with tokens starting like this one"),
        ]
        wait, limit = max(waits, key=lambda pair: pair[0])
        return (wait, limit) if wait else (0.0, "")
