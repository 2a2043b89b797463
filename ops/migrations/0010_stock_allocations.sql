-- Stock the fulfilment flow allocated to an order: what moving it to
-- 'allocated' took off inventory.quantity (and reserved_quantity), per
-- product. An order that fails after that gives exactly these units back, in
-- the transaction that fails it, and marks the rows released, once.
CREATE TABLE inventory_allocations (
    order_id      bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id    bigint NOT NULL REFERENCES products(id),
    quantity      integer NOT NULL CHECK (quantity > 0),
    allocated_at  timestamptz NOT NULL DEFAULT now(),
    released_at   timestamptz,
    PRIMARY KEY (order_id, product_id)
);

-- Orders allocated before this table existed and still in the flow: their
-- allocation took their lines (an order is reserved line by line, and a paid
-- order's reservations are kept until allocation).
INSERT INTO inventory_allocations (order_id, product_id, quantity, allocated_at)
SELECT i.order_id, i.product_id, i.quantity, o.updated_at
  FROM order_items i JOIN orders o ON o.id = i.order_id
 WHERE o.status IN ('allocated', 'processing', 'label_created');
