-- Auth codes exchanged recently, so that a caller retrying ExchangeAuthCode gets the
-- stored token set instead of a second request to Tiki, which would reject the used
-- code and revoke the grant it created. Only the SHA-256 of each code is kept, and rows
-- older than the retry window are deleted.
CREATE TABLE auth_code_exchanges (
    code_hash   TEXT NOT NULL PRIMARY KEY,
    app         TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    -- When the first call sent the code to Tiki (RFC 3339 UTC, as in token_sets).
    started_at  TEXT NOT NULL,
    -- When that call stored the token set; NULL while it waits for Tiki.
    finished_at TEXT
);

CREATE INDEX auth_code_exchanges_started ON auth_code_exchanges (started_at);
