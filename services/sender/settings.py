"""Settings of the sender service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class SenderSettings(CommonSettings):
    service: str = "sender"
    http_port: int = env("HTTP_PORT", 8084)
    #: relays in failover order, "host:port[,host:port]"; empty = one relay SMTP_HOST:SMTP_PORT.
    smtp_relays: str = env("SMTP_RELAYS", "")
    #: the single relay when SMTP_RELAYS is empty (`tayori dev` sets these: public names).
    smtp_host: str = env("SMTP_HOST", "127.0.0.1")
    smtp_port: int = env("SMTP_PORT", 1025)
    #: persistent connections per relay (messages in flight per relay).
    smtp_connections: int = env("SMTP_CONNECTIONS", 16)
    #: messages per second per relay; 0 = no limit.
    smtp_rate_limit: float = env("SMTP_RATE_LIMIT", 0.0)
    #: STARTTLS: off | opportunistic (when offered) | required.
    smtp_starttls: str = env("SMTP_STARTTLS", "opportunistic")
    #: verify the relay's certificate when using TLS.
    smtp_tls_verify: bool = env("SMTP_TLS_VERIFY", True)
    smtp_username: str = env("SMTP_USERNAME", "")
    smtp_password: str = env("SMTP_PASSWORD", "", secret=True)
    #: the name we give in EHLO; empty = this host's name.
    smtp_helo_name: str = env("SMTP_HELO_NAME", "")
    #: seconds to wait for a relay's reply (or to connect), but the end of data's (below).
    smtp_timeout: float = env("SMTP_TIMEOUT", 60.0)
    #: seconds to wait for the reply to a message's end of data (RFC 5321 §4.5.3.2.6: ten
    #: minutes; the relay may be filtering the message). Giving up sends it again.
    smtp_data_timeout: float = env("SMTP_DATA_TIMEOUT", 600.0)
    #: a message refused with 4xx is tried again this many times, then temporary_error.
    smtp_temp_retries: int = env("SMTP_TEMP_RETRIES", 3)
    #: first delay (seconds) before retrying a 4xx; doubles each time.
    smtp_retry_backoff: float = env("SMTP_RETRY_BACKOFF", 30.0)
    #: first delay (seconds) before reconnecting to a relay that failed; doubles up to 30 s.
    smtp_relay_backoff: float = env("SMTP_RELAY_BACKOFF", 1.0)
    #: DKIM signing, off unless selector, domain and a key are all set.
    dkim_selector: str = env("DKIM_SELECTOR", "")
    dkim_domain: str = env("DKIM_DOMAIN", "")
    #: PEM; or a file named by DKIM_PRIVATE_KEY_FILE.
    dkim_private_key: str = env("DKIM_PRIVATE_KEY", "", secret=True)
    #: the domain of VERP return paths b-<token>@<domain> (the bounce processor's inbound MX).
    bounce_domain: str = env("BOUNCE_DOMAIN", "bounces.localhost")
    #: From (and return path) of operator notifications (mail.system).
    system_from: str = env("SYSTEM_MAIL_FROM", "tayori@localhost")
    #: relaying through an ESP: besides X-Tayori-Ref, the header each named ESP echoes in
    #: its webhooks (ses, sendgrid, mailgun, postmark; comma-separated). See README.
    esp_ref_headers: str = env("ESP_REF_HEADERS", "")
    #: send.requests records per fetch (big batches: one claim transaction per batch).
    send_batch: int = env("SENDER_BATCH", 4000)
    #: days finished ledger rows (and campaign.control ids) are kept: longer than a send
    #: request can be redelivered or replayed (the retention of send.requests).
    ledger_retention_days: int = env("SENDER_LEDGER_RETENTION_DAYS", 30)
    #: seconds between two upkeep passes.
    maintenance_interval_seconds: float = env("MAINTENANCE_INTERVAL_SECONDS", 3600.0)
    #: campaigns whose built MIME is kept (LRU).
    render_cache: int = env("SENDER_RENDER_CACHE", 64)

    def relays(self) -> list[tuple[str, int]]:
        """(host, port) of every relay, in failover order."""
        spec = self.smtp_relays.strip()
        if not spec:
            return [(self.smtp_host, int(self.smtp_port))]
        relays = []
        for part in spec.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"SMTP_RELAYS: expected host:port, got {part!r}")
            relays.append((host.strip("[]"), int(port)))
        return relays
