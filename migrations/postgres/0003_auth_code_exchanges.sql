-- Auth codes exchanged recently, so that a caller retrying ExchangeAuthCode gets the
-- stored token set instead of a second request to Tiki, which would reject the used
-- code and revoke the grant it created. Only the SHA-256 of each code is kept, and rows
-- older than the retry window are deleted.
CREATE TABLE auth_code_exchanges (
    code_hash   text        NOT NULL PRIMARY KEY,
    app         text        NOT NULL,
    user_id     text        NOT NULL,
    -- When the first call sent the code to Tiki.
    started_at  timestamptz NOT NULL,
    -- When that call stored the token set; NULL while it waits for Tiki.
    finished_at timestamptz
);

CREATE INDEX auth_code_exchanges_started ON auth_code_exchanges (started_at);
