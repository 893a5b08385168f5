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

    #: per-recipient-domain pacing (pacing.py): off = every domain unlimited, no AIMD.
    domain_pacing: bool = env("SENDER_DOMAIN_PACING", True)
    #: messages per second and transactions in flight for a domain with no built-in
    #: default (domains.DEFAULTS) and no override; 0 = unlimited.
    domain_rate: float = env("SENDER_DOMAIN_RATE", 0.0)
    domain_connections: int = env("SENDER_DOMAIN_CONNECTIONS", 0)
    #: a delivery that would wait longer than this for its domain (paused, capped) is
    #: recorded as temporary_error (not sent) instead of holding its batch.
    domain_max_wait_seconds: float = env("SENDER_DOMAIN_MAX_WAIT_SECONDS", 900.0)
    #: a delivery whose domain would keep it waiting longer than this in all (what it
    #: waited already, plus its own wait and the domain's queue at its rate; a pause or
    #: daily cap: what remains of it) is held: written to held_delivery so its batch
    #: commits while it waits (ledger.py). Decided again when its domain slows.
    domain_hold_seconds: float = env("SENDER_DOMAIN_HOLD_SECONDS", 2.0)
    #: seconds between two sweeps for the held deliveries of senders that are gone.
    hold_sweep_seconds: float = env("SENDER_HOLD_SWEEP_SECONDS", 15.0)
    #: AIMD: a 4xx multiplies the domain's rate by DECREASE (not below FLOOR msgs/s); each
    #: delivery adds INCREASE msgs/s back.
    domain_aimd_decrease: float = env("SENDER_DOMAIN_AIMD_DECREASE", 0.5)
    domain_aimd_increase: float = env("SENDER_DOMAIN_AIMD_INCREASE", 0.1)
    domain_aimd_floor: float = env("SENDER_DOMAIN_AIMD_FLOOR", 0.2)
    #: at most one decrease per domain per this many seconds (a burst's 4xx count once).
    domain_aimd_decrease_interval_seconds: float = env(
        "SENDER_DOMAIN_AIMD_DECREASE_INTERVAL_SECONDS", 1.0
    )
    #: PAUSE_AFTER rate-limit answers (421, 4.7.x) within WINDOW seconds pause the domain
    #: for PAUSE seconds.
    domain_pause_after: int = env("SENDER_DOMAIN_PAUSE_AFTER", 3)
    domain_pause_window_seconds: float = env("SENDER_DOMAIN_PAUSE_WINDOW_SECONDS", 60.0)
    domain_pause_seconds: float = env("SENDER_DOMAIN_PAUSE_SECONDS", 300.0)
    #: per-domain metrics name this many domains (by volume); the rest are "other".
    domain_metrics_top: int = env("SENDER_DOMAIN_METRICS_TOP", 20)
    #: seconds between two loads of the operator overrides (another replica's writes).
    domain_overrides_refresh_seconds: float = env("SENDER_DOMAIN_OVERRIDES_REFRESH_SECONDS", 30.0)

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
