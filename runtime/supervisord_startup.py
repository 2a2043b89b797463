"""What supervisord itself does when the process tree starts: empty the metrics directory.

The multiprocess metrics directory must start empty with each tree, or the
first scrape adds the previous run's counters to this one's. Only the start
of the whole tree may empty it: a program that merely restarts must find its
predecessors' counter files still there, or totals would go backwards.

supervisord has no "before the programs" hook, but it builds the XML-RPC
interfaces of every ``[rpcinterface:*]`` section in ``Supervisor.run()``
(``options.openhttpservers``) *before* ``runforever()`` spawns the first
program, once per start of supervisord and again after ``supervisorctl
reload`` (which first stops every program). ``supervisord.conf`` therefore
declares::

    [rpcinterface:shopflow]
    supervisor.rpcinterface_factory = runtime.supervisord_startup:make_startup_interface

and the factory empties the directory there, whether supervisord was started by
``shopflow up`` or by hand. It reads the settings from supervisord's own
environment, which every program inherits, so it empties exactly the directory
they will write to. A failure stops supervisord from starting (its log says
why) rather than letting it run with skewed totals. The interface it returns
(``shopflow.getStartup``) tells what was prepared.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.metrics import prepare_metrics_dir
from runtime.settings import Settings


class StartupInterface:
    """The ``shopflow`` XML-RPC namespace: what this start of the tree prepared."""

    def __init__(self, metrics_dir: Path, prepared_at: datetime) -> None:
        self._metrics_dir = metrics_dir
        self._prepared_at = prepared_at

    def getStartup(self) -> dict[str, str]:  # XML-RPC method names are camelCase
        """``{"metrics_dir", "prepared_at"}`` of the current start of supervisord."""
        return {"metrics_dir": str(self._metrics_dir),
                "prepared_at": self._prepared_at.isoformat()}


def prepare_tree_start(env: dict[str, str] | None = None) -> Path:
    """Empty the metrics directory named by ``env`` (default: this process's environment)."""
    return prepare_metrics_dir(Settings.from_env(os.environ if env is None else env))


def make_startup_interface(supervisord: Any, **config: str) -> StartupInterface:
    """supervisord's ``rpcinterface_factory``: runs in supervisord before any program starts."""
    path = prepare_tree_start()
    supervisord.options.logger.info(f"shopflow: emptied the metrics directory {path}")
    return StartupInterface(path, datetime.now(UTC))
