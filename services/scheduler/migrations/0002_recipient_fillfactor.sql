-- Each recipient row is updated when it is released and when its result arrives; room in
-- each page lets the result update (no indexed column changes) be HOT.
ALTER TABLE recipient SET (fillfactor = 70);
