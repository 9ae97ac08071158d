"""dtfctl's connection to a cluster: any node's URL works; requests fail over between nodes."""

from __future__ import annotations

import os
import ssl
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_CONFIG = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "dtf" / "dtfctl.toml"
# Written by the Debian package's postinst (mode 0600, root's): used when DEFAULT_CONFIG is absent.
SYSTEM_CONFIG = Path("/etc/dtf/dtfctl.toml")


class CtlError(Exception):
    """What went wrong, said in one line for the operator; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Target:
    urls: list[str]
    token: str
    ca_file: str = ""

    @classmethod
    def resolve(cls, cluster: str | None, token: str | None, config: str | None) -> Target:
        """--cluster/--token, then DTF_CLUSTER/DTF_TOKEN, then the dtfctl config file."""
        file: dict = {}
        path = Path(config) if config else DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else SYSTEM_CONFIG
        if config or path.exists():
            try:
                file = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise CtlError(f"{path}: {exc}") from None
        urls = cluster or os.environ.get("DTF_CLUSTER") or ",".join(file.get("cluster", []))
        token = token or os.environ.get("DTF_TOKEN") or file.get("token", "")
        if not urls:
            raise CtlError("no cluster given: use --cluster URL[,URL...], DTF_CLUSTER, or a config file (dtfctl config init)", 64)
        normalized = [u if "://" in u else f"http://{u}" for u in (u.strip() for u in urls.split(",")) if u]
        return cls(normalized, token, os.environ.get("DTF_CA_FILE") or file.get("ca_file", ""))


@dataclass
class Client:
    target: Target
    timeout: float = 5.0
    _http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.target.ca_file) if self.target.ca_file else True
        headers = {"Authorization": f"Bearer {self.target.token}"} if self.target.token else {}
        self._http = httpx.Client(headers=headers, timeout=self.timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def node(self, url: str, path: str, timeout: float = 1.5) -> dict | None:
        """One node's answer, or None if it cannot be reached or answers with an error."""
        try:
            reply = self._http.get(url + path, timeout=timeout)
        except httpx.HTTPError:
            return None
        return reply.json() if reply.status_code == 200 else None

    def request(self, method: str, path: str, json: object = None, params: dict | None = None, deadline_s: float = 15.0) -> dict:
        """Ask the cluster: the first node that answers wins; 503 and connection errors move on."""
        deadline = time.monotonic() + deadline_s
        last = "no node answered"
        while True:
            for url in self.target.urls:
                try:
                    reply = self._http.request(method, url + path, json=json, params=params)
                except httpx.HTTPError as exc:
                    last = f"{url}: {type(exc).__name__}"
                    continue
                if reply.status_code == 503:
                    last = f"{url}: {_message(reply)}"
                    continue
                if reply.status_code >= 400:
                    raise CtlError(f"{method} {path}: {reply.status_code} {_message(reply)}")
                return reply.json()
            if time.monotonic() > deadline:
                raise CtlError(f"cluster unavailable ({last})", 2)
            time.sleep(0.2)


def _message(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]
