-- Issue 20: unsubscribes and bans per day (GET /v1/stats/daily) read the window's refused
-- memberships only, from the index alone. Deliverable rows (nearly all) stay out of it.
CREATE INDEX membership_refused_changed_idx ON membership (changed_at)
    INCLUDE (state, method, contact_id) WHERE state <> 'deliverable';
