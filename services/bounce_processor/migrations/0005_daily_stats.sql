-- Issue 20: bounces and complaints per day (GET /v1/stats/daily) read the window's rows
-- only, from the index alone (the classification rides along).
CREATE INDEX bounce_occurred_idx ON bounce (occurred_at) INCLUDE (classification);
