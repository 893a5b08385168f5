-- The trace of the request that reserved a campaign (libs/common/trace): its releases run in
-- it, so its send.requests, the senders' results and every log line about them carry its id.
ALTER TABLE campaign ADD COLUMN traceparent text;
