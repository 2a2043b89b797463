"""The queue monitor: checks every queue's health each minute and raises alerts.

``queue_stats`` reads Dramatiq's Redis keys, ``rules`` decides what is
wrong (plain functions over plain data), ``service`` ties both to metrics
and alerts on a timer, ``messages`` is what other concerns may send it.
"""
