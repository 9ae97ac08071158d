"""dtfctl: the operator's CLI."""

import sys

from dtfd.ctl.cli import main as _main


def main() -> int:
    return _main(sys.argv[1:])
