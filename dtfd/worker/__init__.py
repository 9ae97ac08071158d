"""dtf-worker: the agent on each test machine (lands with the workload issue)."""

from dtfd.cli import not_yet


def main() -> int:
    return not_yet("dtf-worker")
