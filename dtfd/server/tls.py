"""TLS contexts for the client API and the peer links, from the `[tls]` config section.

Both directions verify: servers present `cert_file`; clients (peers dialling, forwarding
followers) check the other side's certificate against `ca_file` and its configured host.
"""

from __future__ import annotations

import ssl

from dtfd.config import ConfigError, Tls


def server_context(tls: Tls) -> ssl.SSLContext | None:
    if not tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert_file/tls.key_file: cannot load: {exc}") from None
    return context


def client_context(tls: Tls) -> ssl.SSLContext | None:
    if not tls.cert_file:
        return None
    try:
        return ssl.create_default_context(cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.ca_file: cannot load: {exc}") from None
