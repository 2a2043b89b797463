-- Scheduling and housekeeping: the stored daily sales reports, and the indexes the
-- housekeeping statements and the report query use.

-- One row per local calendar day of the shop's zone. Recomputing a day replaces its
-- numbers; handed_off_at is set once, in the transaction that queues the e-mail.
CREATE TABLE daily_sales_reports (
    report_date           date PRIMARY KEY,
    timezone              text NOT NULL,
    period_start          timestamptz NOT NULL,
    period_end            timestamptz NOT NULL,
    orders_count          integer NOT NULL,
    completed_orders      integer NOT NULL,
    revenue_cents         bigint NOT NULL,
    average_basket_cents  integer NOT NULL,
    failed_orders         integer NOT NULL,
    cancelled_orders      integer NOT NULL,
    top_products          jsonb NOT NULL,
    computed_at           timestamptz NOT NULL,
    handed_off_at         timestamptz,
    CONSTRAINT report_period_ordered CHECK (period_start < period_end)
);

-- Expired-cart cleanup scans only anonymous carts by age.
CREATE INDEX sched_carts_anonymous_updated_idx ON carts (updated_at) WHERE customer_id IS NULL;
-- The daily report reads one local day of orders.
CREATE INDEX sched_orders_created_idx ON orders (created_at);
