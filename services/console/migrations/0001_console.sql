-- The console's own state: its users, their sessions and preferences, login throttling,
-- and who did what through it (the services record the role's token, the console the person).
CREATE TABLE console_user (
    id            bigserial PRIMARY KEY,
    username      text NOT NULL,
    email         text,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    lang          text NOT NULL DEFAULT 'ja' CHECK (lang IN ('ja', 'en')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX console_user_username ON console_user (lower(username));
CREATE UNIQUE INDEX console_user_email ON console_user (lower(email)) WHERE email IS NOT NULL;

-- A session: the cookie holds a random token, the table its SHA-256 (a database read does
-- not give anyone a usable cookie).
CREATE TABLE console_session (
    token_hash  bytea PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES console_user (id) ON DELETE CASCADE,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_session_expires ON console_session (expires_at);

-- Failed logins per account and client address.
CREATE TABLE login_failure (
    key          text PRIMARY KEY,
    failures     int NOT NULL,
    last_at      timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz
);

-- Every write the console made on a person's behalf.
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    user_id    bigint REFERENCES console_user (id) ON DELETE SET NULL,
    username   text NOT NULL,
    action     text NOT NULL,
    target     text,
    detail     jsonb NOT NULL DEFAULT '{}',
    status     int NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_at ON audit_log (at);

-- A CSV file between its upload and the import it starts (the preview and column mapping
-- come in between); removed when the import starts or after a day.
CREATE TABLE pending_upload (
    id          text PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES console_user (id) ON DELETE CASCADE,
    filename    text NOT NULL,
    content     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
