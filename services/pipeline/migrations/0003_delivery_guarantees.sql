-- Delivery guarantees (issue 4): claims before SMTP, suppression list, circuit breakers,
-- the stored recipient (for resends), and the reason a send was parked by a pause.

-- At most one handoff to SMTP per (send, attempt): taken and committed before the
-- SMTP conversation, its result written after it. A claim left without a result
-- (the sender died, or no reply after DATA) becomes `unknown` after
-- MAILER_CLAIM_TIMEOUT and is never sent again by itself.
CREATE TABLE send_claims (
    send_id      uuid NOT NULL,
    attempt      integer NOT NULL,
    campaign_id  text NOT NULL,
    account      text NOT NULL,
    recipient    text NOT NULL,
    is_test      boolean NOT NULL DEFAULT false,
    claimed_by   text NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    result       text CHECK (result IN ('sent', 'failed', 'deferred', 'unknown')),
    outcome      bytea,  -- the outcome message produced for it: a redelivered command repeats it
    finished_at  timestamptz,
    PRIMARY KEY (send_id, attempt)
);
CREATE INDEX send_claims_open_idx ON send_claims (claimed_at) WHERE result IS NULL;

-- Addresses never mailed again (R32): unsubscribes, hard bounces, complaints.
CREATE TABLE suppressions (
    email        text PRIMARY KEY,  -- normalised (services/pipeline/ids.py normalize_email)
    reason       text NOT NULL CHECK (reason IN ('unsubscribe', 'hard_bounce', 'complaint', 'manual')),
    source       text NOT NULL DEFAULT '',
    suppressed_at timestamptz NOT NULL DEFAULT now()
);

-- Consecutive transient SMTP errors per campaign and per account (R10).
CREATE TABLE circuit_breakers (
    scope        text NOT NULL CHECK (scope IN ('campaign', 'account')),
    key          text NOT NULL,
    consecutive  integer NOT NULL DEFAULT 0,
    opened_at    timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- The recipient as the chunk carried it (name, variables): a resend rebuilds its command.
ALTER TABLE recipients ADD COLUMN data jsonb;

-- Resend commands already carried out (B2): a replayed one does nothing.
CREATE TABLE resend_requests (
    message_id   text PRIMARY KEY,
    campaign_id  text NOT NULL,
    recipients   integer NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);
