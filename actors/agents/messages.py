"""The messages the agents accept: import these to send work to them.

Arguments are JSON values:

- ``RECOMMEND.send(broker, customer_id, refresh)``: compute (``refresh=True``:
  recompute) and cache a customer's recommendations;
- ``REFRESH_RECOMMENDATIONS.send(broker)``: fan out ``RECOMMEND`` with
  ``refresh=True`` for recently active customers (the scheduler sends it);
- ``ANSWER_SUPPORT.send(broker, customer_id, question)``: answer and log a
  support question (the answer lands in ``support_interactions``);
- ``MODERATE_REVIEW.send(broker, review_id)``: moderate a new review (send it
  on every review submission, e.g. as the outbox job of the insert).
"""

from __future__ import annotations

from runtime.broker import QUEUE_MODERATION, QUEUE_RECOMMENDATIONS, QUEUE_SUPPORT, JobSpec

RECOMMEND = JobSpec(QUEUE_RECOMMENDATIONS, "agents.recommend")
REFRESH_RECOMMENDATIONS = JobSpec(QUEUE_RECOMMENDATIONS, "agents.refresh_recommendations")
ANSWER_SUPPORT = JobSpec(QUEUE_SUPPORT, "agents.answer_support")
MODERATE_REVIEW = JobSpec(QUEUE_MODERATION, "agents.moderate_review")
