-- The name the console gave the services for the user of each write (X-Tayori-Requested-By:
-- the user's email, else the username), so an audit row and the services' rows it caused
-- (jobs, membership changes) name the same person. NULL before this column.
ALTER TABLE audit_log ADD COLUMN requested_by text;
