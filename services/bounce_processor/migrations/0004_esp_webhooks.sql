-- Issue 21: ESP event webhooks. Event ids seen (a repeated one is a replay, refused),
-- forgotten after ESP_EVENT_RETENTION_DAYS; bounces may come from an ESP's webhook.
CREATE TABLE esp_event (
    esp       text NOT NULL,
    event_id  text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (esp, event_id)
);
CREATE INDEX esp_event_seen_at_idx ON esp_event (seen_at);

ALTER TABLE bounce DROP CONSTRAINT IF EXISTS bounce_source_check;
ALTER TABLE bounce ADD CONSTRAINT bounce_source_check
    CHECK (source IN ('dsn', 'arf', 'heuristic', 'smtp', 'ses', 'sendgrid', 'mailgun',
                      'postmark')) NOT VALID;
ALTER TABLE bounce VALIDATE CONSTRAINT bounce_source_check;
