-- An operator's clearing of a bounced address arrives by address (suppression.changes keys
-- address changes by email, the contact id only when suppression knows it): find the
-- contacts with that address without a scan.
CREATE INDEX contact_state_email_idx ON contact_state (lower(email));
