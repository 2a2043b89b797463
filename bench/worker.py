"""``python -m bench.worker <peer>``: one peer's worker process, started by the harness.

Its configuration comes from the environment the harness sets (the same
variables the job body reads), so each peer's worker starts the way that
library's own worker would: a fresh interpreter, nothing shared with the harness.
"""

from __future__ import annotations

import logging
import os
import sys

from bench.body import ENV_RESULTS_KEY, ENV_RESULTS_URL
from bench.harness import BenchEnv
from bench.peers import peer_by_key

ENV_REDIS_URL = "BENCH_REDIS_URL"
ENV_QUEUE = "BENCH_QUEUE"
ENV_SLOTS = "BENCH_SLOTS"


def env_vars(env: BenchEnv) -> dict[str, str]:
    """The environment that hands ``env`` to a worker process."""
    return {ENV_REDIS_URL: env.redis_url, ENV_RESULTS_URL: env.results_url,
            ENV_RESULTS_KEY: env.results_key, ENV_QUEUE: env.queue, ENV_SLOTS: str(env.slots)}


def main(argv: list[str]) -> int:
    """Run the named peer's worker until SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    e = os.environ
    env = BenchEnv(redis_url=e[ENV_REDIS_URL], results_url=e[ENV_RESULTS_URL],
                   results_key=e[ENV_RESULTS_KEY], queue=e[ENV_QUEUE], slots=int(e[ENV_SLOTS]))
    peer_by_key(argv[0]).run_worker(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
