-- Who claimed a row: the advisory-lock key a live sender holds for as long as it runs.
-- A 'claimed' row of a live owner is in flight there (a rebalance handed its partition
-- over meanwhile) and is not sent again; a dead owner's row is taken over.
ALTER TABLE send_ledger ADD COLUMN owner bigint;
