-- The person who asked for an export (X-Tayori-Requested-By: the console's user), else the
-- role of the token. requested_by stays the role: downloading needs at least that role.
ALTER TABLE export_job ADD COLUMN requester text;
