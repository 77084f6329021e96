-- Sending discipline (issue 3): campaign queue state, parked sends, notification
-- dedup, warm-up steps. The deferral reasons are a closed set, here and in
-- services/pipeline/defer_reasons.py (a unit test keeps the two equal).

ALTER TABLE campaigns
    ADD COLUMN queued_at       timestamptz,
    ADD COLUMN rate_per_hour   integer NOT NULL DEFAULT 0,
    ADD COLUMN working_hours   jsonb,
    ADD COLUMN deadline        timestamptz,
    ADD COLUMN defer_reason    text NOT NULL DEFAULT '',
    ADD COLUMN deferred_until  timestamptz,
    ADD COLUMN deferred_at     timestamptz,
    ADD CONSTRAINT campaigns_deferral_has_reason
        CHECK (deferred_until IS NULL OR defer_reason <> ''),
    ADD CONSTRAINT campaigns_defer_reason_known
        CHECK (defer_reason IN ('', 'rate_per_hour', 'campaign_rate', 'domain_throttle', 'daily_limit', 'warmup_cap', 'quota_exhausted', 'quota_unknown', 'outside_hours', 'limiter_unavailable', 'transient_error', 'circuit_open', 'campaign_paused'));
CREATE INDEX campaigns_deferred_idx ON campaigns (deferred_until) WHERE defer_reason <> '';

-- Sends the limits or the SMTP server turned away, waiting for their time.
-- One row per send id: a later deferral of the same send replaces it; a
-- replayed older one (parked_at not newer) changes nothing. Released rows are
-- kept (released_at set) so a replay cannot bring a send back twice.
CREATE TABLE parked_sends (
    send_id      uuid PRIMARY KEY,
    campaign_id  text NOT NULL,
    account      text NOT NULL,
    priority     smallint NOT NULL,
    queued_at    timestamptz NOT NULL,
    reason       text NOT NULL CHECK (reason IN ('rate_per_hour', 'campaign_rate', 'domain_throttle', 'daily_limit', 'warmup_cap', 'quota_exhausted', 'quota_unknown', 'outside_hours', 'limiter_unavailable', 'transient_error', 'circuit_open', 'campaign_paused')),
    due_at       timestamptz NOT NULL,
    command      bytea NOT NULL,
    parked_at    timestamptz NOT NULL,
    released_at  timestamptz
);
CREATE INDEX parked_sends_due_idx ON parked_sends (account, due_at) WHERE released_at IS NULL;
CREATE INDEX parked_sends_campaign_idx ON parked_sends (campaign_id, due_at) WHERE released_at IS NULL;
CREATE INDEX parked_sends_released_idx ON parked_sends (account, released_at)
    WHERE released_at IS NOT NULL;

-- One campaign.status event per (campaign, reason, until), ever (R20).
CREATE TABLE status_notifications (
    campaign_id  text NOT NULL,
    reason       text NOT NULL,
    until        timestamptz NOT NULL DEFAULT '-infinity',
    notified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, reason, until)
);

-- Each warming-up account's step in its schedule of daily caps.
CREATE TABLE account_warmup (
    account     text PRIMARY KEY,
    stage       integer NOT NULL DEFAULT 0 CHECK (stage >= 0),
    stage_day   date NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The warm-up step and the limiter restore read an account's recent sends.
CREATE INDEX send_log_account_idx ON send_log (account, occurred_at);

-- A send may now be deferred and later sent under the same attempt number.
ALTER TABLE send_log DROP CONSTRAINT send_log_pkey;
ALTER TABLE send_log ADD PRIMARY KEY (send_id, attempt, outcome);
