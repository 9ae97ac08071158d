"""dtfctl: the operator's CLI (lands with its issue)."""

from dtfd.cli import not_yet


def main() -> int:
    return not_yet("dtfctl")
