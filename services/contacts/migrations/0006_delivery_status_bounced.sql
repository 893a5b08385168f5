-- F-32: an address stopped by repeated soft bounces gets a status of its own, 'bounced'
-- (バウンス), instead of staying 'temporary_error' — so search sees it as stopped and the
-- frozen list of the next campaign leaves it out up front. NOT VALID then VALIDATE: the
-- check is proved without holding the table's exclusive lock for the scan.
ALTER TABLE contact DROP CONSTRAINT IF EXISTS contact_delivery_status_check;
ALTER TABLE contact ADD CONSTRAINT contact_delivery_status_check
    CHECK (delivery_status IN ('unconfirmed', 'ok', 'invalid_address', 'error',
                               'temporary_error', 'spam', 'bounced')) NOT VALID;
ALTER TABLE contact VALIDATE CONSTRAINT contact_delivery_status_check;
