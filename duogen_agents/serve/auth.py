"""What ``duogen serve`` and ``duogen mcp`` share about who may call them: bearer tokens from
``$DUOGEN_API_KEY`` (comma-separated for several), and no bind beyond loopback without one."""

from __future__ import annotations

import ipaddress
import os

from duogen_agents.errors import ConfigError

API_KEY_ENV = "DUOGEN_API_KEY"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def api_keys_from_env() -> tuple[str, ...]:
    """The bearer tokens in ``$DUOGEN_API_KEY``."""
    return tuple(k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip())


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: tuple[str, ...], what: str = "listen") -> None:
    """Refuse to expose the models and sessions beyond this machine without a token."""
    if not is_loopback(host) and not api_keys:
        raise ConfigError(
            f"refusing to {what} on {host} without a token: set {API_KEY_ENV} (one or more comma-separated bearer "
            "tokens; clients send 'Authorization: Bearer <key>'), or bind 127.0.0.1"
        )
