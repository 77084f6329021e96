-- One round trip per claim (issue 7): the campaign's shared advisory lock, the
-- campaign, breaker and suppression checks and the claim row, in one call.
-- Returns one row (verdict, detail, outcome): verdict 'claimed', or the refusal
-- reason 'paused' | 'cancelled' | 'breaker' | 'suppressed' | 'duplicate'. The
-- session-level lock stays held whatever the verdict; the caller releases it
-- after SMTP (services/sender/claims.py). Run it outside an explicit transaction
-- so the claim row is committed before SMTP is spoken to; its commit is
-- synchronous even on a session whose other writes (the finish records) are not.
CREATE FUNCTION claim_send(
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
               AND ((scope = 'campaign' AND key = p_campaign_id)
                    OR (scope = 'account' AND key = p_account))) THEN
        verdict := 'breaker';
        detail := 'circuit breaker open: waiting for the campaign to resume';
        RETURN;
    END IF;
    SELECT reason INTO v_reason FROM suppressions WHERE email = p_normalized;
    IF FOUND THEN
        verdict := 'suppressed';
        detail := 'address suppressed: ' || v_reason;
        RETURN;
    END IF;
    INSERT INTO send_claims (send_id, attempt, campaign_id, account, recipient, is_test, claimed_by)
    VALUES (p_send_id, p_attempt, p_campaign_id, p_account, p_recipient, p_is_test, p_owner)
    ON CONFLICT (send_id, attempt) DO NOTHING;
    IF FOUND THEN
        verdict := 'claimed';
        detail := '';
        RETURN;
    END IF;
    SELECT c.claimed_by, c.claimed_at, c.result, c.outcome INTO v_by, v_at, v_result, outcome
    FROM send_claims c WHERE c.send_id = p_send_id AND c.attempt = p_attempt;
    verdict := 'duplicate';
    detail := format('attempt %s was claimed by %s at %s (result: %s)',
                     p_attempt, coalesce(v_by, '?'), v_at, coalesce(v_result, 'none yet'));
END;
$$;
