-- F-32: an address stopped by repeated soft bounces has the status 'bounced' (バウンス).
ALTER TABLE contact_state DROP CONSTRAINT IF EXISTS contact_state_delivery_status_check;
ALTER TABLE contact_state ADD CONSTRAINT contact_state_delivery_status_check
    CHECK (delivery_status IN ('unconfirmed', 'ok', 'invalid_address', 'error',
                               'temporary_error', 'spam', 'bounced')) NOT VALID;
ALTER TABLE contact_state VALIDATE CONSTRAINT contact_state_delivery_status_check;
