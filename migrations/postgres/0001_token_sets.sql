-- One row per user of a Tini App. The columns an operator reads come first; the
-- tokens come last.
CREATE TABLE token_sets (
    app              text        NOT NULL DEFAULT 'default',
    user_id          text        NOT NULL,
    status           text        NOT NULL
                     CHECK (status IN ('active', 'refresh_failing', 'reauth_required')),
    scopes           text        NOT NULL DEFAULT '',
    expires_at       timestamptz NOT NULL,
    next_refresh_at  timestamptz,
    refreshed_at     timestamptz,
    failure_count    integer     NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- The replica refreshing this token set, and until when its claim lasts.
    claimed_by       text,
    claim_until      timestamptz,
    -- Seconds of validity Tiki granted the current access token (its `expires_in`).
    lifetime_seconds bigint      NOT NULL,
    -- True while the stored refresh token was sent once and no answer arrived.
    outcome_unknown  boolean     NOT NULL DEFAULT false,
    -- Increases with every change of tokens or state (not with claims), so that a
    -- stale cache entry can be detected.
    version          bigint      NOT NULL DEFAULT 1,
    -- Fences the writes of the current claim.
    claim_token      bigint,
    -- The replica that wrote the row last.
    updated_by       text,
    access_token     text        NOT NULL,
    refresh_token    text,
    PRIMARY KEY (app, user_id)
);

-- Finds due token sets without scanning the table.
CREATE INDEX token_sets_due ON token_sets (next_refresh_at)
    WHERE next_refresh_at IS NOT NULL;

-- Tells every replica listening on tokend_token_sets which token set changed, so that
-- it drops its cached access token. A deletion carries no writer, so that every
-- replica acts on it.
CREATE FUNCTION token_sets_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed token_sets;
    writer text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
        writer := NULL;
    ELSE
        changed := NEW;
        writer := NEW.updated_by;
    END IF;
    PERFORM pg_notify('tokend_token_sets', json_build_object(
        'app', changed.app,
        'user_id', changed.user_id,
        'version', changed.version,
        'writer', writer)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER token_sets_notify
    AFTER INSERT OR UPDATE OR DELETE ON token_sets
    FOR EACH ROW EXECUTE FUNCTION token_sets_notify();
