-- Circuit breakers that close again (issue 14, defects 10-12).
--
-- An account breaker no longer waits for a resume to close: after its cool-down
-- (`probe_after`) it is half-open and lets exactly one send through (the probe,
-- `probe_send`, claimed at `probe_at`); the probe delivered closes it, a probe meeting
-- the server's trouble reopens it with a cool-down twice as long (`cooldown_seconds`).
-- `campaigns` names the campaigns whose errors make up the current count, so a cancel
-- can close a breaker only its own errors opened. `breaker_audit` records who closed a
-- breaker by hand (`mailer ops breaker reset`), and what a cancel or a probe changed.
ALTER TABLE circuit_breakers
    ADD COLUMN campaigns         text[] NOT NULL DEFAULT '{}',
    ADD COLUMN cooldown_seconds  double precision,
    ADD COLUMN probe_after       timestamptz,
    ADD COLUMN probe_send        uuid,
    ADD COLUMN probe_at          timestamptz;

CREATE TABLE breaker_audit (
    id           bigserial PRIMARY KEY,
    scope        text NOT NULL,
    key          text NOT NULL,
    action       text NOT NULL,   -- reset | closed_by_cancel | half_open_by_cancel | probe_closed | probe_reopened
    actor        text NOT NULL,
    reason       text NOT NULL DEFAULT '',
    consecutive  integer NOT NULL DEFAULT 0,
    opened_at    timestamptz,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX breaker_audit_key_idx ON breaker_audit (scope, key, at);

-- claim_send (migration 0005) with the half-open account breaker: an open campaign
-- breaker refuses; a suppressed address is refused before the account breaker is asked;
-- an open account breaker refuses until its cool-down has passed, then lets one send
-- through as its probe (the first to take the slot; a probe that never finished frees
-- the slot after max(cool-down, 60 s); a duplicate gives it back). Otherwise unchanged.
CREATE OR REPLACE FUNCTION claim_send(
    p_campaign_id text, p_account text, p_send_id uuid, p_attempt integer,
    p_recipient text, p_normalized text, p_is_test boolean, p_owner text,
    OUT verdict text, OUT detail text, OUT outcome bytea
) LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_reason text;
    v_by text;
    v_at timestamptz;
    v_result text;
    v_probe boolean := false;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);  -- the claim must survive a crash
    PERFORM pg_advisory_lock_shared(hashtextextended(p_campaign_id, 7));
    SELECT status INTO v_status FROM campaigns WHERE campaign_id = p_campaign_id;
    IF v_status IN ('paused', 'cancelled') THEN
        verdict := v_status;
        detail := format('campaign %s is %s', p_campaign_id, v_status);
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM circuit_breakers WHERE opened_at IS NOT NULL
               AND scope = 'campaign' AND key = p_campaign_id) THEN
        verdict := 'breaker';
        detail := 'circuit breaker of the campaign open: waiting for the campaign to resume';
        RETURN;
    END IF;
    SELECT reason INTO v_reason FROM suppressions WHERE email = p_normalized;
    IF FOUND THEN
        verdict := 'suppressed';
        detail := 'address suppressed: ' || v_reason;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM circuit_breakers WHERE opened_at IS NOT NULL
               AND scope = 'account' AND key = p_account) THEN
        UPDATE circuit_breakers SET probe_send = p_send_id, probe_at = now(), updated_at = now()
        WHERE scope = 'account' AND key = p_account AND opened_at IS NOT NULL
          AND probe_after IS NOT NULL AND probe_after <= now()
          AND (probe_send IS NULL
               OR probe_at < now() - make_interval(secs => greatest(coalesce(cooldown_seconds, 60), 60)));
        v_probe := FOUND;
        IF NOT v_probe THEN
            verdict := 'breaker';
            detail := 'circuit breaker of the account open: waiting for its half-open probe';
            RETURN;
        END IF;
    END IF;
    INSERT INTO send_claims (send_id, attempt, campaign_id, account, recipient, is_test, claimed_by)
    VALUES (p_send_id, p_attempt, p_campaign_id, p_account, p_recipient, p_is_test, p_owner)
    ON CONFLICT (send_id, attempt) DO NOTHING;
    IF FOUND THEN
        verdict := 'claimed';
        detail := '';
        RETURN;
    END IF;
    IF v_probe THEN  -- a duplicate never reaches SMTP: it cannot be the account's probe
        UPDATE circuit_breakers SET probe_send = NULL, probe_at = NULL
        WHERE scope = 'account' AND key = p_account AND probe_send = p_send_id;
    END IF;
    SELECT c.claimed_by, c.claimed_at, c.result, c.outcome INTO v_by, v_at, v_result, outcome
    FROM send_claims c WHERE c.send_id = p_send_id AND c.attempt = p_attempt;
    verdict := 'duplicate';
    detail := format('attempt %s was claimed by %s at %s (result: %s)',
                     p_attempt, coalesce(v_by, '?'), v_at, coalesce(v_result, 'none yet'));
END;
$$;
