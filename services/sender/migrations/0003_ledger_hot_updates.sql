-- Every ledger row is updated twice (claimed → handed → done). With status in no index and
-- room left in each page, those updates are HOT: PostgreSQL writes no index entries for
-- them, which was most of its CPU per message in the campaign benchmark.
DROP INDEX send_ledger_unfinished_idx;
ALTER TABLE send_ledger SET (fillfactor = 50);
