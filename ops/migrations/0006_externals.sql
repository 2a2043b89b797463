-- Issue 7: the concerns that talk to the outside world.

-- A warehouse quantity below what is reserved locally. The syncer keeps
-- quantity = reserved_quantity (nothing more can be sold, nothing reserved is
-- taken away) and opens one conflict per product for staff; a later sync in
-- which the warehouse has enough again resolves it automatically.
CREATE TABLE stock_conflicts (
    id                   bigserial PRIMARY KEY,
    product_id           bigint NOT NULL REFERENCES products(id),
    external_id          text NOT NULL,
    warehouse_quantity   integer NOT NULL,
    reserved_quantity    integer NOT NULL,
    status               text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution           text,
    detected_at          timestamptz NOT NULL DEFAULT now(),
    last_seen_at         timestamptz NOT NULL DEFAULT now(),
    resolved_at          timestamptz
);
CREATE UNIQUE INDEX stock_conflicts_one_open ON stock_conflicts (product_id) WHERE status = 'open';

-- The SendGrid transport's own ledger: intent recorded before the HTTP call,
-- outcome after. 'sending' that outlives its call means the outcome is
-- unknown (timeout after SendGrid may have accepted) and must be reconciled.
CREATE TABLE email_provider_sends (
    idempotency_key  text PRIMARY KEY,
    provider         text NOT NULL,
    state            text NOT NULL CHECK (state IN ('sending', 'accepted', 'not_sent', 'rejected')),
    attempts         integer NOT NULL DEFAULT 0,
    provider_id      text,
    last_error       text,
    first_sent_at    timestamptz NOT NULL DEFAULT now(),
    last_sent_at     timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

-- Abandoned-cart reminders: at most one per cart, ever. The row is written
-- when a reminder is scheduled for a given cart version (updated_at) and
-- moves to 'sent' or 'cancelled' exactly once.
CREATE TABLE cart_reminders (
    cart_id          bigint PRIMARY KEY REFERENCES carts(id) ON DELETE CASCADE,
    cart_updated_at  timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,
    status           text NOT NULL DEFAULT 'scheduled' CHECK (status IN ('scheduled', 'sent', 'cancelled')),
    reason           text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    decided_at       timestamptz
);
CREATE INDEX cart_reminders_due_idx ON cart_reminders (due_at) WHERE status = 'scheduled';
CREATE INDEX carts_open_idle_idx ON carts (updated_at) WHERE status = 'open' AND customer_id IS NOT NULL;
