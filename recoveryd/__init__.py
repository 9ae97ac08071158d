"""recoveryd: probes every dtfd node and repairs it (restart, state transfer), recording every step.

Modules: config (the TOML file), executors (systemd units or local processes), probes
(evidence), policy (verdicts, confirmation, limits), actions (idempotent, resumable
steps), records (DuckDB, JSON lines, metrics), daemon (the decision loop and its HTTP).
"""


def main() -> int:
    from recoveryd.daemon import main as run

    return run()
