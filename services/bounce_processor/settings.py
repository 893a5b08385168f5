"""Settings of the bounce processor (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class BounceSettings(CommonSettings):
    service: str = "bounce_processor"
    http_port: int = env("HTTP_PORT", 8085)
    #: the inbound SMTP listener for the VERP return path (the bounce domain's MX points here).
    smtp_host: str = env("BOUNCE_SMTP_HOST", "0.0.0.0")
    smtp_port: int = env("BOUNCE_SMTP_PORT", 2525)
    #: the domain of VERP return paths b-<token>@<domain>; RCPT to other domains is refused.
    bounce_domain: str = env("BOUNCE_DOMAIN", "bounces.localhost")
    #: F-31: this many soft bounces in a row (no open or click between) stop the address.
    soft_threshold: int = env("BOUNCE_SOFT_THRESHOLD", 5)
    #: largest inbound mail accepted (SMTP 552 beyond); DSNs carry headers, rarely more.
    max_message_bytes: int = env("BOUNCE_MAX_MESSAGE_BYTES", 2 << 20)
    #: bytes of an unattributable or unreadable mail kept with its reason.
    keep_bytes: int = env("BOUNCE_KEEP_BYTES", 64 << 10)
    #: inbound mails read and applied per transaction.
    batch: int = env("BOUNCE_BATCH", 200)
    #: upkeep: how often, and how long consumed result ids and unreadable mail are kept.
    maintenance_interval_seconds: float = env("MAINTENANCE_INTERVAL_SECONDS", 3600.0)
    processed_event_retention_days: int = env("PROCESSED_EVENT_RETENTION_DAYS", 14)
    rejected_retention_days: int = env("BOUNCE_REJECTED_RETENTION_DAYS", 30)
    #: ESP webhooks (README "Relaying through an ESP"); an ESP left unconfigured answers 404.
    #: SES: the SNS topic ARNs whose notifications are accepted (comma-separated).
    esp_ses_topic_arns: str = env("ESP_SES_TOPIC_ARNS", "")
    #: SES: confirm an SNS subscription of an allowed topic by GET of its SubscribeURL.
    esp_ses_auto_confirm: bool = env("ESP_SES_AUTO_CONFIRM", True)
    #: SendGrid: the Event Webhook's verification key (base64 DER as SendGrid shows it).
    esp_sendgrid_public_key: str = env("ESP_SENDGRID_PUBLIC_KEY", "")
    #: Mailgun: the HTTP webhook signing key.
    esp_mailgun_signing_key: str = env("ESP_MAILGUN_SIGNING_KEY", "", secret=True)
    #: Postmark: the basic-auth user and password put in the webhook URL.
    esp_postmark_username: str = env("ESP_POSTMARK_USERNAME", "")
    esp_postmark_password: str = env("ESP_POSTMARK_PASSWORD", "", secret=True)
    #: a signed timestamp (SNS, SendGrid, Mailgun) further than this from now is a replay.
    esp_webhook_tolerance_seconds: float = env("ESP_WEBHOOK_TOLERANCE_SECONDS", 900.0)
    #: days event ids are kept to refuse a replay (far longer than the tolerance, and than
    #: Postmark, which signs no timestamp, retries).
    esp_event_retention_days: int = env("ESP_EVENT_RETENTION_DAYS", 7)

    def ses_topics(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.esp_ses_topic_arns.split(",") if a.strip())
