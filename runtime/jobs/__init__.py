"""The job model on top of Dramatiq: options, records, priorities, limits, control.

Producers send through :class:`runtime.broker.JobSpec` (options checked when
the message is built); workers run :class:`JobsMiddleware` on a
:class:`JobBroker`; operators use :class:`JobStore` (Python), the HTTP API
and ``shopflow jobs``. See docs/jobs.md.
"""
