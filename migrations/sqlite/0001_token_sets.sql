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
    -- The replica refreshing this token set, and until when its claim lasts.
    claimed_by       TEXT,
    claim_until      TEXT,
    -- Seconds of validity Tiki granted the current access token (its `expires_in`).
    lifetime_seconds INTEGER NOT NULL,
    -- 1 while the stored refresh token was sent once and no answer arrived.
    outcome_unknown  INTEGER NOT NULL DEFAULT 0 CHECK (outcome_unknown IN (0, 1)),
    -- Increases with every change of tokens or state (not with claims), so that a
    -- stale cache entry can be detected.
    version          INTEGER NOT NULL DEFAULT 1,
    -- Fences the writes of the current claim.
    claim_token      INTEGER,
    -- The replica that wrote the row last.
    updated_by       TEXT,
    access_token     TEXT    NOT NULL,
    refresh_token    TEXT,
    PRIMARY KEY (app, user_id)
);

CREATE INDEX token_sets_due ON token_sets (next_refresh_at)
    WHERE next_refresh_at IS NOT NULL;
