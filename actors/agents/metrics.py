"""Per-agent Prometheus metrics, created on a registry the caller passes in.

Nothing is created at import: the observability wiring builds these once per
process on its (multiprocess) registry; tests build them on a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

# Model calls take from a few hundred milliseconds to tens of seconds.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class AgentMetrics:
    """The agents' metric objects; every one is labelled by ``agent``."""

    calls: Counter  # agent, outcome (ok, invalid, timeout, api_error, cancelled)
    latency_s: Histogram  # agent
    tokens: Counter  # agent, kind (input, output)
    cost_usd: Counter  # agent
    answers: Counter  # agent, source (model, fallback, policy)
    fallbacks: Counter  # agent, reason
    invalid_outputs: Counter  # agent, reason


def create_agent_metrics(registry: CollectorRegistry) -> AgentMetrics:
    """Create the agents' metrics on ``registry`` (call once per registry)."""
    return AgentMetrics(
        calls=Counter(
            "shopflow_agent_calls_total", "Model API calls made by an agent, by outcome.",
            ["agent", "outcome"], registry=registry,
        ),
        latency_s=Histogram(
            "shopflow_agent_call_latency_seconds", "Latency of one model request (the gateway's retries included).",
            ["agent"], buckets=LATENCY_BUCKETS_S, registry=registry,
        ),
        tokens=Counter(
            "shopflow_agent_tokens_total", "Tokens reported by the API, input and output.",
            ["agent", "kind"], registry=registry,
        ),
        cost_usd=Counter(
            "shopflow_agent_estimated_cost_usd_total",
            "Estimated model cost in US dollars (token counts times the configured prices).",
            ["agent"], registry=registry,
        ),
        answers=Counter(
            "shopflow_agent_answers_total", "Answers given by an agent, by the source that produced them.",
            ["agent", "source"], registry=registry,
        ),
        fallbacks=Counter(
            "shopflow_agent_fallbacks_total", "Answers that came from the offline fallback, by reason.",
            ["agent", "reason"], registry=registry,
        ),
        invalid_outputs=Counter(
            "shopflow_agent_invalid_outputs_total",
            "Model answers that were not trusted (cut, prose, not JSON, out of schema, unknown ids).",
            ["agent", "reason"], registry=registry,
        ),
    )
