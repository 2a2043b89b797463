"""LLM agents: product recommendations, support answers, review moderation.

Each agent asks the Anthropic Messages API for a tool call whose input is
validated against a JSON schema, and answers from an offline fallback when the
model cannot be asked (no key, over budget, API failing) or answered something
we may not trust. Every answer says which source produced it.

Public surface: the plain async functions in :mod:`actors.agents.recommendation`,
:mod:`actors.agents.support` and :mod:`actors.agents.moderation`, the job
addresses in :mod:`actors.agents.messages`, :func:`actors.agents.deps.open_deps`
and :func:`actors.agents.jobs.register_actors`.
"""
