-- Issue 6: guards at start, throttles and permissions (R13-R16).

-- A campaign may wait for its manager's confirmation, or be refused at start (it stays visible).
ALTER TABLE campaigns DROP CONSTRAINT campaigns_status_check;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_status_check
    CHECK (status IN ('sending', 'paused', 'cancelled', 'completed', 'needs_confirmation', 'refused'));
-- Warnings given at start (large campaign, quota 0, outside working hours), shown by the poll endpoint.
ALTER TABLE campaigns ADD COLUMN warnings jsonb NOT NULL DEFAULT '[]';

-- The one decision on each start and test email, shared by the planner and the reconciler:
-- whoever sees the command first decides (under the manager's advisory lock), the other reads it,
-- and a replay reads it too, so both services and every replay act alike.
CREATE TABLE command_admissions (
    admission_key text PRIMARY KEY,  -- 'start:<campaign_id>' or 'test_email:<message_id>'
    campaign_id   text NOT NULL,
    manager_id    text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('campaign.start', 'campaign.test_email')),
    decision      text NOT NULL CHECK (decision IN ('accepted', 'needs_confirmation', 'refused', 'forbidden')),
    reason_code   text NOT NULL DEFAULT '',
    reason        text NOT NULL DEFAULT '',
    reason_ru     text NOT NULL DEFAULT '',
    warnings      jsonb NOT NULL DEFAULT '[]',
    decided_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX command_admissions_manager_idx ON command_admissions (manager_id, kind, decided_at);

-- The planner's chunks: how many recipients each brought (the maximum counts every chunk), and the
-- chunks it holds while their campaign waits for confirmation.
CREATE TABLE planner_chunks (
    campaign_id  text NOT NULL,
    chunk_index  integer NOT NULL,
    recipients   integer NOT NULL,
    held         jsonb,  -- the chunk while its campaign needs confirmation; NULL once planned
    PRIMARY KEY (campaign_id, chunk_index)
);
