-- A row's event goes to its stream once, even while its job waits for room in a full queue.
-- published_at still means "done" (event out, job enqueued or set aside); event_published_at
-- is when the relay XADDed the event, so a held row retries only its job. No backfill: the relay
-- reads only unpublished rows, and rewriting every published row would be a long lock for nothing.
ALTER TABLE outbox ADD COLUMN event_published_at timestamptz;
