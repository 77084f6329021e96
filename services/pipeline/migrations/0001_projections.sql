-- Projections kept by the reconciler and the planner's replay guard.

CREATE TABLE campaigns (
    campaign_id      text PRIMARY KEY,
    manager_id       text NOT NULL DEFAULT '',
    name             text NOT NULL DEFAULT '',
    account          text NOT NULL DEFAULT 'default',
    priority         smallint NOT NULL DEFAULT 5,
    status           text NOT NULL
        CHECK (status IN ('sending', 'paused', 'cancelled', 'completed')),
    status_reason    text NOT NULL DEFAULT '',
    total_declared   integer NOT NULL DEFAULT 0,
    chunks_declared  integer NOT NULL DEFAULT 0,
    chunks_received  integer NOT NULL DEFAULT 0,
    total            integer NOT NULL DEFAULT 0,
    pending          integer NOT NULL DEFAULT 0,
    sent             integer NOT NULL DEFAULT 0,
    failed           integer NOT NULL DEFAULT 0,
    skipped          integer NOT NULL DEFAULT 0,
    unknown          integer NOT NULL DEFAULT 0,
    cancelled        integer NOT NULL DEFAULT 0,
    started          boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    first_sent_at    timestamptz,
    completed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX campaigns_status_idx ON campaigns (status);

-- Which chunks of a campaign the reconciler has seen (replays are no-ops).
CREATE TABLE campaign_chunks (
    campaign_id  text NOT NULL,
    chunk_index  integer NOT NULL,
    recipients   integer NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, chunk_index)
);

CREATE TABLE recipients (
    send_id        uuid PRIMARY KEY,
    campaign_id    text NOT NULL,
    email          text NOT NULL,
    name           text NOT NULL DEFAULT '',
    status         text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'deferred', 'sent', 'failed', 'skipped', 'unknown',
                          'cancelled')),
    attempts       integer NOT NULL DEFAULT 0,
    last_code      integer,
    last_reply     text NOT NULL DEFAULT '',
    error_class    text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recipients_campaign_status_idx ON recipients (campaign_id, status);

-- One row per attempt the sender reported.
CREATE TABLE send_log (
    send_id        uuid NOT NULL,
    attempt        integer NOT NULL,
    campaign_id    text NOT NULL,
    outcome        text NOT NULL,
    is_test        boolean NOT NULL DEFAULT false,
    recipient      text NOT NULL,
    account        text NOT NULL,
    smtp_code      integer,
    smtp_reply     text NOT NULL DEFAULT '',
    error_class    text,
    reason         text,
    message_id     text NOT NULL DEFAULT '',
    duration_ms    double precision,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (send_id, attempt)
);
CREATE INDEX send_log_campaign_idx ON send_log (campaign_id, occurred_at);

-- Every status change of a campaign: who, before, after, why, when.
CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    campaign_id    text NOT NULL,
    actor          text NOT NULL,
    action         text NOT NULL,
    before_status  text,
    after_status   text,
    reason         text NOT NULL DEFAULT '',
    source_message_id text,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_campaign_idx ON audit_log (campaign_id, at);

-- The planner's replay guard: a send id is planned (produced) once.
CREATE TABLE planned_sends (
    send_id      uuid PRIMARY KEY,
    campaign_id  text NOT NULL,
    planned_at   timestamptz NOT NULL DEFAULT now()
);

-- Campaign definitions the planner needs for later chunks.
CREATE TABLE planner_campaigns (
    campaign_id  text PRIMARY KEY,
    definition   jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

-- Events written in the same transaction as the change they announce, then
-- published and deleted (transactional outbox): a status event is never lost.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    key         text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
