"""`dtfd verify`: check a data dir offline and report, changing nothing.

Exit 0 when the node would start (a torn tail or other repair it would make is a
warning), 65 when it would refuse (corruption), 66 when there is no data dir (or it
cannot be read).
`--json` prints one object with stable keys: data_dir, status (ok | corrupt |
missing), exit_code, locked, hard_state, snapshots, segments, log, warnings, problems.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from dtfd.storage import snapshots
from dtfd.storage.datadir import LOCK_FILE, SNAP_DIR, Inspection, inspect
from dtfd.storage.interface import EX_DATAERR, EX_NOINPUT, StorageCorrupt
from dtfd.storage.wal import Finding


def _locked(data_dir: str) -> bool:
    """Whether a running node holds the dir (its in-flight writes may show as a torn tail)."""
    try:
        fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _finding(f: Finding | StorageCorrupt) -> dict[str, Any]:
    return {"path": f.path, "offset": f.offset, "problem": f.problem}


def _snapshot_files(data_dir: str) -> list[dict[str, Any]]:
    found, _ = snapshots.list_files(os.path.join(data_dir, SNAP_DIR))
    report = []
    for index, term, path in found:
        item = {"path": path, "index": index, "term": term, "size": os.path.getsize(path), "digest": None, "ok": True, "problem": None}
        try:
            item["digest"] = snapshots.read(path).meta.digest
        except StorageCorrupt as e:
            item.update(ok=False, problem=e.problem)
        report.append(item)
    return report


def report(data_dir: str) -> dict[str, Any]:
    """The verify report as a JSON-ready dict."""
    if not os.path.isdir(data_dir):
        return {"data_dir": data_dir, "status": "missing", "exit_code": EX_NOINPUT}
    ins: Inspection = inspect(data_dir)
    hs = ins.hard_state
    segments = [
        {
            "path": s.path,
            "seq": s.seq,
            "first_index": s.first_index,
            "last_index": s.last_index,
            "records": len(s.offsets),
            "bytes": s.size,
            "first_term": s.first_term,
            "last_term": s.last_term,
        }
        for s in ins.wal.segments
    ]
    entries = ins.wal.entries
    return {
        "data_dir": data_dir,
        "status": "corrupt" if ins.problems else "ok",
        "exit_code": EX_DATAERR if ins.problems else 0,
        "locked": _locked(data_dir),
        "hard_state": None if hs is None else {"term": hs.term, "vote": hs.vote, "commit": hs.commit},
        "snapshots": _snapshot_files(data_dir),
        "segments": segments,
        "log": {
            "first_index": entries[0].index if entries else None,
            "last_index": entries[-1].index if entries else None,
            "entries": len(entries),
            "after_snapshot": len(ins.entries),
        },
        "warnings": [_finding(w) for w in ins.warnings],
        "problems": [_finding(p) for p in ins.problems],
    }


def _where(f: dict[str, Any]) -> str:
    return f["path"] if f["offset"] is None else f"{f['path']} at offset {f['offset']}"


def format_report(r: dict[str, Any]) -> str:
    if r["status"] == "missing":
        return f"{r['data_dir']}: " + r.get("error", "no such data directory")
    lines = [f"data dir {r['data_dir']}" + (" (in use by a running node)" if r["locked"] else "")]
    hs = r["hard_state"]
    lines.append("hard state: " + ("none" if hs is None else f"term={hs['term']} vote={hs['vote'] or '-'} commit={hs['commit']}"))
    lines.append(f"snapshots: {len(r['snapshots'])}")
    for s in r["snapshots"]:
        state = "ok" if s["ok"] else f"BAD: {s['problem']}"
        lines.append(f"  {os.path.basename(s['path'])} index={s['index']} term={s['term']} bytes={s['size']} {state}")
    lines.append(f"wal segments: {len(r['segments'])}")
    for s in r["segments"]:
        span = f"{s['first_index']}..{s['last_index']}" if s["records"] else f"empty, starts at {s['first_index']}"
        terms = f" terms={s['first_term']}..{s['last_term']}" if s["records"] else ""
        lines.append(f"  {os.path.basename(s['path'])} index={span} records={s['records']}{terms} bytes={s['bytes']}")
    lg = r["log"]
    if lg["entries"]:
        lines.append(f"log: {lg['first_index']}..{lg['last_index']} ({lg['after_snapshot']} entries after the snapshot)")
    else:
        lines.append("log: empty")
    lines += [f"warning: {_where(w)}: {w['problem']}" for w in r["warnings"]]
    lines += [f"CORRUPT: {_where(p)}: {p['problem']}" for p in r["problems"]]
    lines.append("result: " + ("corrupt, the node will refuse to start" if r["problems"] else "ok"))
    return "\n".join(lines)


def run(data_dir: str, as_json: bool = False) -> int:
    try:
        r = report(data_dir)
    except OSError as e:  # unreadable: sysexits counts that as no input too
        r = {"data_dir": data_dir, "status": "missing", "exit_code": EX_NOINPUT, "error": str(e)}
    print(json.dumps(r, indent=2) if as_json else format_report(r))
    return r["exit_code"]
