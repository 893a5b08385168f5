-- Search (F-05): "all deliverable" and "any unsubscribed/banned" look for stopped memberships;
-- they are few, so a partial index finds them without reading every membership.
CREATE INDEX membership_stopped_idx ON membership (contact_id, state)
    WHERE state IN ('unsubscribed', 'banned');
