-- Foundation schema: the shop's data and the runtime's outbox.
-- Money is integer cents (R$); times are timestamptz, stored in UTC.

CREATE TABLE customers (
    id           bigint PRIMARY KEY,
    name         text NOT NULL,
    email        text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    id            bigint PRIMARY KEY,
    sku           text NOT NULL UNIQUE,
    name          text NOT NULL,
    category      text NOT NULL DEFAULT 'music',
    price_cents   integer NOT NULL CHECK (price_cents >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inventory (
    product_id         bigint PRIMARY KEY REFERENCES products(id),
    quantity           integer NOT NULL CHECK (quantity >= 0),
    reserved_quantity  integer NOT NULL DEFAULT 0,
    external_id        text UNIQUE,
    synced_at          timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT no_overselling CHECK (reserved_quantity >= 0 AND reserved_quantity <= quantity)
);

CREATE TABLE orders (
    id               bigserial PRIMARY KEY,
    customer_id      bigint NOT NULL REFERENCES customers(id),
    status           text NOT NULL DEFAULT 'pending',
    status_reason    text,
    total_cents      integer NOT NULL CHECK (total_cents >= 0),
    external_ref     text UNIQUE,
    correlation_id   uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT order_status_known CHECK (status IN (
        'pending', 'reserved', 'paid', 'allocated', 'processing', 'label_created',
        'ready_to_ship', 'shipped', 'delivered', 'failed', 'cancelled'))
);
CREATE INDEX orders_status_idx ON orders (status);
CREATE INDEX orders_customer_idx ON orders (customer_id, created_at DESC);

CREATE TABLE order_items (
    order_id          bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id        bigint NOT NULL REFERENCES products(id),
    quantity          integer NOT NULL CHECK (quantity > 0),
    unit_price_cents  integer NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, product_id)
);

-- Every status change, in order: the order's history.
CREATE TABLE order_status_history (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    from_status text,
    to_status   text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_status_history_order_idx ON order_status_history (order_id, id);

CREATE TABLE inventory_reservations (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES products(id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT one_reservation_per_order_product UNIQUE (order_id, product_id)
);
CREATE INDEX inventory_reservations_expiry_idx ON inventory_reservations (expires_at);

CREATE TABLE carts (
    id           bigserial PRIMARY KEY,
    customer_id  bigint REFERENCES customers(id),
    status       text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'checked_out', 'abandoned')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX carts_updated_idx ON carts (updated_at);

CREATE TABLE cart_items (
    cart_id     bigint NOT NULL REFERENCES carts(id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES products(id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (cart_id, product_id)
);

CREATE TABLE shipments (
    id              bigserial PRIMARY KEY,
    order_id        bigint NOT NULL UNIQUE REFERENCES orders(id) ON DELETE CASCADE,
    carrier         text NOT NULL,
    tracking_code   text NOT NULL,
    label_url       text,
    packing_ref     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per logical e-mail: the idempotency key makes a retry a no-op.
CREATE TABLE email_log (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    kind             text NOT NULL,
    recipient        text NOT NULL,
    subject          text NOT NULL,
    order_id         bigint REFERENCES orders(id) ON DELETE SET NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    transport        text NOT NULL,
    provider_id      text,
    error            text,
    attempts         integer NOT NULL DEFAULT 0,
    -- While 'sending', no other delivery may start before this time.
    lease_until      timestamptz,
    correlation_id   uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz
);

CREATE TABLE support_interactions (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES customers(id),
    question     text NOT NULL,
    answer       text,
    source       text,
    input_tokens integer NOT NULL DEFAULT 0,
    output_tokens integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reviews (
    id              bigserial PRIMARY KEY,
    customer_id     bigint NOT NULL REFERENCES customers(id),
    product_id      bigint NOT NULL REFERENCES products(id),
    rating          smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected', 'manual_review')),
    moderation      jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    moderated_at    timestamptz
);

-- The transactional outbox: written in the same transaction as the change
-- that causes it, delivered by the relay after commit.
CREATE TABLE outbox (
    id              bigserial PRIMARY KEY,
    channel         text NOT NULL,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    -- Dramatiq message to enqueue on delivery (queue, actor, args), or NULL.
    job             jsonb,
    correlation_id  uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
