-- What the CRM was last told about each campaign (issue 14, defects 3, 4, 17): the status
-- and deferral reason of its last campaign.status event, the counts that event carried and
-- its sequence number. A status event is queued in the outbox together with this row, so
-- the row always says what the campaign's last event holds. Counts that change after the
-- event of a settled campaign (paused, cancelled, completed) are published again as a
-- correction; `mailer reconcile` compares this row with the projections.
CREATE TABLE status_announcements (
    campaign_id   text PRIMARY KEY,
    sequence      bigint NOT NULL CHECK (sequence > 0),
    status        text NOT NULL,
    defer_reason  text NOT NULL DEFAULT '',
    counts        jsonb NOT NULL,
    announced_at  timestamptz NOT NULL DEFAULT now()
);
