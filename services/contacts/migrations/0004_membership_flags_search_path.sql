-- The membership triggers' functions (0003) name contacts' tables and functions without a
-- schema: they run with the search path they were created with, so a writer whose own search
-- path lacks this schema (a tool, a bench writing contacts.membership) keeps the flags too.
ALTER FUNCTION refresh_membership_flags(bigint[]) SET search_path FROM CURRENT;
ALTER FUNCTION membership_flags_changed() SET search_path FROM CURRENT;
