"""`dtfd` command line: run a node (`--config FILE --node ID`) or check a data dir offline (`verify`)."""

from __future__ import annotations

import argparse
import sys


def _reseed(data_dir: str, term: int) -> int:
    import json

    from dtfd.storage.datadir import DataDirLocked, reseed
    from dtfd.storage.interface import EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, StorageCorrupt

    try:
        print(json.dumps(reseed(data_dir, term)))
        return 0
    except FileNotFoundError as exc:
        print(f"dtfd reseed: {exc}", file=sys.stderr)
        return EX_NOINPUT
    except DataDirLocked as exc:
        print(f"dtfd reseed: {exc}; stop the node first", file=sys.stderr)
        return EX_TEMPFAIL
    except StorageCorrupt as exc:
        print(f"dtfd reseed: {exc}", file=sys.stderr)
        return EX_DATAERR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtfd", description="dtf coordinator daemon")
    parser.add_argument("--config", default="/etc/dtf/dtfd.toml", help="cluster config file (default: %(default)s)")
    parser.add_argument("--node", help="this node's id in cluster.nodes")
    sub = parser.add_subparsers(dest="command")
    verify = sub.add_parser("verify", help="check a data directory offline (exit 0 clean, 65 corrupt, 66 missing)")
    verify.add_argument("--data-dir", required=True)
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    reseed = sub.add_parser("reseed", help="move a stopped node's data dir aside; it rejoins empty, without voting until caught up")
    reseed.add_argument("--data-dir", required=True)
    reseed.add_argument("--term", type=int, default=0, help="the cluster's current term (needed if the old hard state is unreadable)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        from dtfd.storage.verify import run

        return run(args.data_dir, as_json=args.json)
    if args.command == "reseed":
        return _reseed(args.data_dir, args.term)
    if not args.node:
        parser.error("--node is required to run a node")
    from dtfd.server.daemon import run

    return run(args.config, args.node)


if __name__ == "__main__":
    sys.exit(main())
