-- Correlation: an order's whole story for `shopflow trace ORDER_ID`.
-- order_trail holds the steps that leave no row elsewhere (a job that failed
-- for good, a page, an operator's note); status changes, outbox events and
-- e-mails are read from their own tables by correlation id.

CREATE TABLE order_trail (
    id              bigserial PRIMARY KEY,
    order_id        bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    correlation_id  uuid,
    source          text NOT NULL,
    step            text NOT NULL,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_trail_order_idx ON order_trail (order_id, at, id);

-- The trace looks rows up by correlation id.
CREATE INDEX outbox_correlation_idx ON outbox (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX email_log_correlation_idx ON email_log (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX email_log_order_idx ON email_log (order_id) WHERE order_id IS NOT NULL;
