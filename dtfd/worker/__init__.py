"""dtf-worker: the agent on each test machine. `dtf-worker --config FILE` runs it until SIGTERM.

Exit codes: 0 stopped on request (after draining and deregistering), 78 bad configuration
or a token the coordinator refuses (the unit does not restart either).
"""

from __future__ import annotations

import argparse
import logging

import trio

from dtfd import journal
from dtfd.config import EX_CONFIG, ConfigError
from dtfd.worker import agent, config

log = logging.getLogger("dtf.worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtf-worker", description="dtf worker agent: leases test tasks and runs them")
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="worker config file (default: %(default)s)")
    args = parser.parse_args(argv)
    journal.setup("info")
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        log.critical("configuration error: %s", exc)
        return EX_CONFIG
    journal.setup(cfg.config.log.level)
    return trio.run(agent.serve, cfg)
