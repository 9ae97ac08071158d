"""recoveryd: probes coordinator nodes and repairs them (lands with its issue)."""

from dtfd.cli import not_yet


def main() -> int:
    return not_yet("recoveryd")
