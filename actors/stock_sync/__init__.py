"""The stock syncer: pulls the warehouse's stock into ``inventory`` every interval.

``sync.py`` holds the business function :func:`~actors.stock_sync.sync.sync_once`;
``warehouse_client.py`` the HTTP adapter; ``daemon.py`` the pykka actor, the
schedule and the ``shopflow stock-sync`` command. See docs/externals.md.
"""
