-- LLM agents: stated preferences, support log details, moderation audit trail.

-- What a customer told us they like; the recommendation agent reads it.
-- `notes` is the customer's own words and is passed to the model as data only.
CREATE TABLE customer_preferences (
    customer_id           bigint PRIMARY KEY REFERENCES customers(id) ON DELETE CASCADE,
    favourite_categories  text[] NOT NULL DEFAULT '{}',
    notes                 text CHECK (length(notes) <= 500),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Co-purchase queries look up a product's latest order items.
CREATE INDEX agents_order_items_product_idx ON order_items (product_id, order_id);

-- Why an answer came from where it came from, and which model gave it.
ALTER TABLE support_interactions
    ADD COLUMN source_detail text,
    ADD COLUMN model text,
    ADD COLUMN latency_ms integer,
    -- The asking request's id (e.g. the Dramatiq message id): a redelivered job answers once.
    ADD COLUMN request_id text UNIQUE;
CREATE INDEX support_interactions_customer_idx ON support_interactions (customer_id, created_at DESC);

-- One row per moderation decision (the review row keeps only the latest):
-- the dashboard lists flagged reviews from here.
CREATE TABLE moderation_log (
    id           bigserial PRIMARY KEY,
    review_id    bigint NOT NULL REFERENCES reviews(id) ON DELETE CASCADE,
    status       text NOT NULL CHECK (status IN ('approved', 'rejected', 'manual_review')),
    source       text NOT NULL,
    approved     boolean,
    confidence   real,
    categories   text[] NOT NULL DEFAULT '{}',
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX moderation_log_flagged_idx ON moderation_log (created_at DESC) WHERE status <> 'approved';
CREATE INDEX reviews_status_idx ON reviews (status);
