"""The aiohttp face of the runtime: HTTP API, WebSocket, dashboard, metrics."""
