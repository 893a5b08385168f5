-- Requests and results a broker lost are noticed within minutes: checkpoints of a release
-- (services/scheduler/checkpoints.py).

ALTER TABLE campaign
    -- chunks of send.requests acknowledged so far; each chunk's rows carry its number.
    ADD COLUMN release_mark   bigint NOT NULL DEFAULT 0,
    -- the mark of the newest checkpoint applied: every row released up to it without a
    -- result has been released again (or was at its last release).
    ADD COLUMN confirmed_mark bigint NOT NULL DEFAULT 0;

-- The chunk a row was last released in (NULL: released before this migration, or never).
-- Not indexed: the result's update of a row stays HOT (0002).
ALTER TABLE recipient ADD COLUMN release_mark bigint;

-- A checkpoint published into every partition of send.requests after the rows released up
-- to its mark; a sender answers it per partition on send.progress.
CREATE TABLE checkpoint (
    id          uuid PRIMARY KEY,
    campaign_id uuid NOT NULL REFERENCES campaign (id) ON DELETE CASCADE,
    mark        bigint NOT NULL,
    partitions  int NOT NULL,
    issued_at   timestamptz NOT NULL,
    -- delivery.results high watermarks by partition, taken once every partition had
    -- answered: the results the senders published before answering are below them.
    fence       bigint[]
);
CREATE INDEX checkpoint_campaign_idx ON checkpoint (campaign_id, mark);

-- The partitions in which a sender reached a checkpoint.
CREATE TABLE checkpoint_reached (
    checkpoint_id uuid NOT NULL REFERENCES checkpoint (id) ON DELETE CASCADE,
    partition     int NOT NULL,
    reached_at    timestamptz NOT NULL,
    PRIMARY KEY (checkpoint_id, partition)
);
