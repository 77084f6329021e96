-- Issue 14, defects 1, 2, 7 and 8: chunks must match what their start declared, an id is one
-- campaign, and every start and chunk that cannot be taken is answered and stays visible.

-- A start that cannot be read (schema, input checks, an unconfigured account) whose campaign_id
-- can be read is kept as a `rejected` campaign (until a valid start with that id arrives), so
-- the poll endpoint answers for it.
ALTER TABLE campaigns DROP CONSTRAINT campaigns_status_check;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_status_check
    CHECK (status IN ('sending', 'paused', 'cancelled', 'completed', 'needs_confirmation', 'refused',
                      'rejected'));

-- Why the last start of a `rejected` campaign was rejected, in both languages.
CREATE TABLE rejected_starts (
    campaign_id  text PRIMARY KEY,
    reason_code  text NOT NULL,
    reason       text NOT NULL,
    reason_ru    text NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now()
);

-- What the first start of a campaign said (a digest of its content, actor and envelope left
-- out): a later start with the same id is a replay only when it says the same.
ALTER TABLE command_admissions ADD COLUMN content_digest text;

-- What each chunk held (a digest of its recipients): a chunk index is taken once, a replay
-- must hold the same recipients. NULL for chunks recorded before this migration.
ALTER TABLE planner_chunks ADD COLUMN digest text;
ALTER TABLE campaign_chunks ADD COLUMN digest text;

-- The chunks refused (undeclared, over the declared total, conflicting, unreadable), the last
-- refusal of each index. A campaign waiting for a refused index says so and `ops stuck` flags it.
CREATE TABLE refused_chunks (
    campaign_id  text NOT NULL,
    chunk_index  integer NOT NULL,
    reason_code  text NOT NULL,
    reason       text NOT NULL,
    reason_ru    text NOT NULL,
    message_id   text,  -- the refused message (a redelivery is answered once)
    refused_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, chunk_index)
);
