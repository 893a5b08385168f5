-- Held deliveries (issue 21): senders hold a delivery whose receiving domain would keep it
-- waiting long (services/sender/holding.py); it has no result yet and is not lost. Each
-- answer to a checkpoint says how many of the campaign's deliveries are held (send.progress
-- v2), so the scheduler waits for them instead of releasing them again or finishing the
-- campaign without them (services/scheduler/processor.py checkpoint_step, senders_hold).

-- The campaign's held count in the answer of this partition (0 from a v1 sender).
ALTER TABLE checkpoint_reached ADD COLUMN held int NOT NULL DEFAULT 0;

ALTER TABLE campaign
    -- the newest answer's held count, when the scheduler received it (its clock: how old
    -- the count is), and when the sender wrote it (its reached_at: which answer is newest).
    ADD COLUMN sender_held         int NOT NULL DEFAULT 0,
    ADD COLUMN sender_held_at      timestamptz,
    ADD COLUMN sender_held_counted timestamptz;
