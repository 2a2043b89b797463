-- Money totals as bigint: an order may carry 100 lines of up to 10,000 units each, so its
-- total can pass integer's 2,147,483,647 cents (R$ 21 million) with ordinary prices; the
-- API caps a total at actors/orders/service.py's MAX_ORDER_TOTAL_CENTS, above integer.
-- A day's average basket can be as large as one order. (Unit prices and quantities stay
-- integer: each is bounded well below it; products of the two are computed as bigint.)
ALTER TABLE orders ALTER COLUMN total_cents TYPE bigint;
ALTER TABLE daily_sales_reports ALTER COLUMN average_basket_cents TYPE bigint;
