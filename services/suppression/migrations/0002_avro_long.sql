-- The two trailing fields of a suppression.changes record (changed_at, version), Avro-encoded
-- by the statement that takes them (store.unsubscribe_by_link): Python encodes every other
-- field before the statement runs, so one statement can change a membership and queue its
-- record in the outbox. Avro's long is a zig-zag varint: 7 bits a byte, low bits first, the
-- high bit set on every byte but the last (tested against fastavro).
CREATE FUNCTION avro_long(n bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    zigzag numeric := CASE WHEN n >= 0 THEN 2 * n::numeric ELSE -2 * n::numeric - 1 END;
    encoded bytea := '\x'::bytea;
BEGIN
    WHILE zigzag >= 128 LOOP
        encoded := encoded || set_byte('\x00'::bytea, 0, (mod(zigzag, 128) + 128)::int);
        zigzag := div(zigzag, 128);
    END LOOP;
    RETURN encoded || set_byte('\x00'::bytea, 0, zigzag::int);
END
$$;

-- Avro's timestamp-millis as fastavro writes it: whole milliseconds since the epoch.
CREATE FUNCTION avro_timestamp_millis(at timestamptz) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN avro_long(floor(extract(epoch FROM at) * 1000)::bigint);
