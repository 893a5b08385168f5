-- Held deliveries (issue 21): a delivery whose domain would keep it waiting longer than
-- SENDER_DOMAIN_HOLD_SECONDS is written here (its send.requests record, re-encodable with
-- libs/common/avro) so that its batch's offsets can be committed while it waits in its
-- sender's pacing queue. The row goes once its outcome is recorded in send_ledger and its
-- result acknowledged by the broker; a sender that is gone leaves its rows to the next
-- one's sweep (agents.sweep_held). See ledger.py "Held deliveries".
CREATE TABLE held_delivery (
    campaign_id text NOT NULL,
    step_id     text NOT NULL,
    contact_id  bigint NOT NULL,
    domain      text NOT NULL,
    value       bytea NOT NULL,      -- the request, Avro (send.requests' schema, see headers)
    headers     jsonb NOT NULL,      -- its Kafka headers: [[name, base64 of the bytes], ...]
    trace       text,                -- the traceparent its result carries
    held_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, step_id, contact_id)
);
