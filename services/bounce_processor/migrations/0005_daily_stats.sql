-- Issue 20: bounces, complaints, opens and clicks per day (GET /v1/stats/daily) read the
-- window's rows only (the classification, the kind ride along). first_at is written once,
-- so the engagement index costs its updates (hits, last_at) no HOT update.
CREATE INDEX bounce_occurred_idx ON bounce (occurred_at) INCLUDE (classification);
CREATE INDEX engagement_first_at_idx ON engagement (first_at) INCLUDE (kind);
