"""Settings of the console (environment variables; see README's table).

The console reaches the services at ``CONSOLE_<SERVICE>_URL`` and calls them with the bearer
token configured for the signed-in user's role: the same ``TAYORI_ADMIN_TOKEN`` /
``TAYORI_API_TOKENS`` the services read, so a role maps to exactly the token of that role
and never to a stronger one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class ConsoleSettings(CommonSettings):
    service: str = "console"
    http_port: int = env("HTTP_PORT", 8080)
    contacts_url: str = env("CONSOLE_CONTACTS_URL", "http://127.0.0.1:8081")
    suppression_url: str = env("CONSOLE_SUPPRESSION_URL", "http://127.0.0.1:8082")
    scheduler_url: str = env("CONSOLE_SCHEDULER_URL", "http://127.0.0.1:8083")
    sender_url: str = env("CONSOLE_SENDER_URL", "http://127.0.0.1:8084")
    bounce_processor_url: str = env("CONSOLE_BOUNCE_PROCESSOR_URL", "http://127.0.0.1:8085")
    exporter_url: str = env("CONSOLE_EXPORTER_URL", "http://127.0.0.1:8086")
    #: the console as its users reach it; an https address makes every cookie Secure (a
    #: request that arrives over TLS gets Secure cookies either way).
    public_url: str = env("CONSOLE_PUBLIC_URL", "http://127.0.0.1:8080")
    #: how long a session lasts without use (hours).
    session_hours: float = env("CONSOLE_SESSION_HOURS", 12.0)
    #: login throttling: this many failures for one account from one address ...
    login_max_failures: int = env("CONSOLE_LOGIN_MAX_FAILURES", 5)
    #: ... lock that pair out for this many seconds.
    login_lock_seconds: int = env("CONSOLE_LOGIN_LOCK_SECONDS", 300)
    #: proxies (CIDRs, comma-separated) whose X-Forwarded-For names the client, e.g. the
    #: ingress controller's pod network: login throttling then counts per account and the
    #: client's address instead of the proxy's. Empty: the peer address is the client.
    trusted_proxies: tuple[str, ...] = env("CONSOLE_TRUSTED_PROXIES", ())
    #: how long one call to a service may take before its page says the service is away.
    api_timeout_seconds: float = env("CONSOLE_API_TIMEOUT_SECONDS", 10.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"CONSOLE_TRUSTED_PROXIES: not a network: {cidr!r}") from None

    def service_urls(self) -> dict[str, str]:
        return {
            "contacts": self.contacts_url,
            "suppression": self.suppression_url,
            "scheduler": self.scheduler_url,
            "sender": self.sender_url,
            "bounce_processor": self.bounce_processor_url,
            "exporter": self.exporter_url,
        }

    def role_tokens(self) -> dict[str, str]:
        """role → the bearer token of exactly that role (the first configured)."""
        tokens: dict[str, str] = {}
        for token, role in self.bearer_tokens().items():
            tokens.setdefault(role, token)
        return tokens

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.lower().startswith("https://")
