-- name: user-by-login
SELECT id, username, email, password_hash, role, lang
FROM console_user
WHERE lower(username) = lower($1) OR lower(email) = lower($1)
ORDER BY lower(username) = lower($1) DESC
LIMIT 1;

-- name: upsert-user
INSERT INTO console_user (username, email, password_hash, role)
VALUES ($1, $2, $3, $4)
ON CONFLICT (lower(username)) DO UPDATE
SET email = COALESCE(EXCLUDED.email, console_user.email),
    password_hash = EXCLUDED.password_hash,
    role = EXCLUDED.role,
    updated_at = now()
RETURNING id, username, email, role, lang;

-- name: rehash-user
UPDATE console_user SET password_hash = $2, updated_at = now() WHERE id = $1;

-- name: set-lang
UPDATE console_user SET lang = $2, updated_at = now() WHERE id = $1;

-- name: insert-session
INSERT INTO console_session (token_hash, user_id, csrf, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4));

-- name: session-user
-- A session in use lives on: each request moves its end forward.
UPDATE console_session s
SET expires_at = now() + make_interval(secs => $2)
FROM console_user u
WHERE s.token_hash = $1 AND s.expires_at > now() AND u.id = s.user_id
RETURNING u.id, u.username, u.email, u.role, u.lang, s.csrf;

-- name: delete-session
DELETE FROM console_session WHERE token_hash = $1;

-- name: delete-expired-sessions
DELETE FROM console_session WHERE expires_at <= now();

-- name: login-lock
SELECT locked_until FROM login_failure WHERE key = $1 AND locked_until > now();

-- name: login-failed
-- One more failure; the max-th within the lock window locks the pair out.
INSERT INTO login_failure AS f (key, failures, last_at)
VALUES ($1, 1, now())
ON CONFLICT (key) DO UPDATE
SET failures = CASE WHEN f.last_at < now() - make_interval(secs => $2) THEN 1
                    ELSE f.failures + 1 END,
    last_at = now()
RETURNING failures;

-- name: lock-login
UPDATE login_failure SET locked_until = now() + make_interval(secs => $2), failures = 0
WHERE key = $1;

-- name: login-succeeded
DELETE FROM login_failure WHERE key = $1;

-- name: audit
INSERT INTO audit_log (user_id, username, action, target, detail, status)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: recent-audit
SELECT username, action, target, status, at FROM audit_log ORDER BY id DESC LIMIT $1;

-- name: forget-old-uploads
DELETE FROM pending_upload WHERE created_at < now() - interval '1 day';

-- name: save-upload
INSERT INTO pending_upload (id, user_id, filename, content) VALUES ($1, $2, $3, $4);

-- name: upload
SELECT filename, content FROM pending_upload WHERE id = $1 AND user_id = $2;

-- name: delete-upload
DELETE FROM pending_upload WHERE id = $1;
