-- The run that holds a running export (a random id per run): a run whose database went
-- away mid-export takes its job up again when it comes back, without waiting for the
-- heartbeat to go stale; another run takes a job over only once its heartbeat is stale.
ALTER TABLE export_job ADD COLUMN runner uuid;
