-- First releases counted apart from re-releases: released counts each recipient once, so it
-- never exceeds planned.

-- releases of a recipient after its first (after a pause, a timeout, a lost request or
-- result).
ALTER TABLE campaign ADD COLUMN re_released bigint NOT NULL DEFAULT 0;

-- released counted re-releases too: recount both from the rows (attempt = releases so far).
UPDATE campaign c SET released = r.first, re_released = r.again
FROM (
    SELECT campaign_id, count(*) AS first, sum(attempt - 1) AS again
    FROM recipient WHERE attempt > 0 GROUP BY campaign_id
) r
WHERE c.id = r.campaign_id;
