-- Upkeep forgets finished ledger rows by the time they were claimed (maintenance.py):
-- a BRIN index fits a column that only grows with the table.
CREATE INDEX send_ledger_claimed_at_brin ON send_ledger USING brin (claimed_at);
