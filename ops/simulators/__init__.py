"""Simulators of the services outside the shop (warehouse, carrier), for the demo and the tests.

Each is an aiohttp app built by a factory, with fault knobs (latency, errors,
hangs, malformed answers) documented in docs/externals.md.
"""
