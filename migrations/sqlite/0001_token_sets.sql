-- One row per user of a Tini App. Times are UTC text in RFC 3339 with millisecond
-- precision and a `Z` suffix, so they read well and compare correctly as strings.
-- The columns an operator reads come first; the tokens come last.
CREATE TABLE token_sets (
    app              TEXT    NOT NULL DEFAULT 'default',
    user_id          TEXT    NOT NULL,
    status           TEXT    NOT NULL
                     CHECK (status IN ('active', 'refresh_failing', 'reauth_required')),
    scopes           TEXT    NOT NULL DEFAULT '',
    expires_at       TEXT    NOT NULL,
    next_refresh_at  TEXT,
    refreshed_at     TEXT,
    failure_count    INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL,
    -- Seconds of validity Tiki granted the current access token (its `expires_in`).
    lifetime_seconds INTEGER NOT NULL,
    -- 1 while the stored refresh token was sent once and no answer arrived.
    outcome_unknown  INTEGER NOT NULL DEFAULT 0 CHECK (outcome_unknown IN (0, 1)),
    -- Increases with every write, so a stale writer or cache entry can be detected.
    version          INTEGER NOT NULL DEFAULT 1,
    access_token     TEXT    NOT NULL,
    refresh_token    TEXT,
    PRIMARY KEY (app, user_id)
);

CREATE INDEX token_sets_due ON token_sets (next_refresh_at)
    WHERE next_refresh_at IS NOT NULL;
