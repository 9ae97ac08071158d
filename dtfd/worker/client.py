"""The coordinator client: any node will do, so it fails over between all of them.

Followers forward writes to the leader, so the worker talks to whichever node answers,
staying with it while it does. A connection error, a timeout or a 502/503/504 moves to
the next URL; after a full round it waits (Retry-After when a node gave one, else a
doubling backoff) and goes round again, until the caller's deadline. Any other error
status is the coordinator's answer and is raised as ApiError, never retried here.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from types import TracebackType

import httpx
import trio

from dtfd.journal import fields

log = logging.getLogger("dtf.worker.client")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
RETRY_AFTER_MAX_S = 10.0


class ApiError(Exception):
    """The coordinator answered with an error; `code` is its machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Unavailable(Exception):
    """No coordinator answered within the deadline."""


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(RETRY_AFTER_MAX_S, max(0.0, float(response.headers.get("retry-after", "0"))))
    except ValueError:
        return 0.0


def _api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:200])


class Client:
    def __init__(self, urls: Sequence[str], token: str, *, ca_file: str = "", request_timeout_s: float = 5.0) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.request_timeout_s = request_timeout_s
        self.current = 0  # the node that answered last
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, verify=verify, timeout=request_timeout_s)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.http.aclose()

    async def call(self, method: str, path: str, body: object = None, *, deadline_s: float, timeout_s: float | None = None) -> dict:
        """The JSON answer of the first node that gives one within `deadline_s` (each try `timeout_s`)."""
        last, first = "no attempt", self.current
        with trio.move_on_after(deadline_s):
            backoff = BACKOFF_MIN_S
            while True:
                wait = backoff
                for _ in self.urls:
                    url = self.urls[self.current]
                    try:
                        response = await self.http.request(method, url + path, json=body, timeout=timeout_s or self.request_timeout_s)
                    except httpx.TransportError as exc:
                        last = f"{url}: {type(exc).__name__} {exc}".strip()
                    else:
                        if response.status_code not in RETRY_STATUSES:
                            if self.current != first:
                                log.info("failed over to another coordinator %s", fields(url=url, after=last))
                            self._prefer_leader(response)
                            return self._answer(response)
                        last = f"{url}: HTTP {response.status_code}"
                        wait = max(wait, _retry_after(response))
                    log.debug("coordinator did not answer %s", fields(method=method, path=path, error=last))
                    self.current = (self.current + 1) % len(self.urls)
                await trio.sleep(wait)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
        raise Unavailable(f"no coordinator answered {method} {path} within {deadline_s:g}s (last: {last})")

    def _prefer_leader(self, response: httpx.Response) -> None:
        """Talk to the leader next time: a follower would only forward the request to it."""
        leader = response.headers.get("x-dtf-leader", "")
        for n, url in enumerate(self.urls):
            if leader and url.split("://", 1)[-1] == leader:
                self.current = n
                return

    def _answer(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise _api_error(response)
        if not response.content:
            return {}
        try:
            answer = response.json()
        except ValueError:
            raise ApiError(response.status_code, "bad_response", "the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ApiError(response.status_code, "bad_response", "the answer is not a JSON object")
        return answer
