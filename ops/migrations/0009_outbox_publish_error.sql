-- A row whose job can never be enqueued (an unknown option, a malformed job) is
-- published with its event and marked with why its job was set aside, instead of
-- blocking the relay (and every event behind it) forever.
ALTER TABLE outbox ADD COLUMN publish_error text;
