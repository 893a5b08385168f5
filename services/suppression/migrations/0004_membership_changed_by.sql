-- Who asked for a membership's last change: the person a client named (the console's user,
-- X-Tayori-Requested-By), else the role of its token, or the requester an upstream or
-- contacts command carried. NULL for a reader's own link and for rows before this column.
ALTER TABLE membership ADD COLUMN changed_by text;
