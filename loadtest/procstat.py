"""Server CPU from /proc: which processes serve a port, and their user + system time.

The load test divides the CPU every server process spent during the run (the processes that
hold the listening socket, so every uvicorn worker, plus their children) by the answered ad
requests. Linux only; elsewhere the figure is reported as unknown.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # TCP state in /proc/net/tcp


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1],
                                                                  16) == port:
                inodes.add(fields[9])
    return inodes


def _pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def listening_pids(port: int) -> set[int]:
    """Processes holding a listening TCP socket on `port` (those this user may inspect)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    found = set()
    if not wanted:
        return found
    for pid in _pids():
        try:
            fds = os.listdir(PROC / str(pid) / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(PROC / str(pid) / "fd" / fd) in wanted:
                    found.add(pid)
                    break
            except OSError:
                continue
    return found


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    """The fields after the name in /proc/<pid>/stat, or /proc/<pid>/task/<tid>/stat."""
    path = PROC / str(pid) if tid is None else PROC / str(pid) / "task" / str(tid)
    try:
        text = (path / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


def _cpu(fields: list[str]) -> float:
    """utime + stime of `_stat_fields`, in seconds (clock-tick resolution)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pids: Iterable[int], exclude: Iterable[int] = ()) -> set[int]:
    """`pids` and every live process below them, but not `exclude` or anything below it.

    The load generator passes itself: a server that started it (a test) must not count it.
    """
    parent_of = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields:
            parent_of[pid] = int(fields[1])
    skip = set(exclude)
    tree = {p for p in pids if p in parent_of and p not in skip}
    grew = True
    while grew:
        children = {p for p, parent in parent_of.items()
                    if parent in tree and p not in tree and p not in skip}
        tree |= children
        grew = bool(children)
    return tree


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """utime + stime per live process, in seconds (clock-tick resolution)."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            out[pid] = _cpu(fields)
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `cpu_seconds` readings; a new process counts in full."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


EVENT_LOOP = "event_loop"  # a process's main thread: where uvicorn runs the event loop
STAGE_PREFIX = "stage-"  # services.common.threads.STAGE_THREAD_PREFIX
OTHER = "other"


def thread_cpu_seconds(pids: Iterable[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """Per (pid, thread id) of the live processes: the thread's group and its utime + stime.

    Groups: `event_loop` for each process's main thread, the kernel's name for a thread named
    `stage-...` (the embedded gateway's stage pools name theirs), `other` for the rest (BLAS
    and uvloop helpers, short-lived pools)."""
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(PROC / str(pid) / "task")]
        except OSError:
            continue
        for tid in tids:
            fields = _stat_fields(pid, tid)
            try:
                name = (PROC / str(pid) / "task" / str(tid) / "comm").read_text().strip()
            except OSError:
                continue
            if fields:
                group = (EVENT_LOOP if tid == pid else
                         name if name.startswith(STAGE_PREFIX) else OTHER)
                out[(pid, tid)] = (group, _cpu(fields))
    return out


def cpu_by_thread(before: dict[tuple[int, int], tuple[str, float]],
                  after: dict[tuple[int, int], tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per thread group between two `thread_cpu_seconds` readings (a new thread
    counts in full), largest first."""
    spent: dict[str, float] = {}
    for key, (group, seconds) in after.items():
        earlier = before.get(key)
        spent[group] = spent.get(group, 0.0) + seconds - (earlier[1] if earlier else 0.0)
    return {g: round(t, 4) for g, t in sorted(spent.items(), key=lambda kv: -kv[1])}


def server_pids(ports: Iterable[int], explicit: Iterable[int] = ()) -> set[int]:
    """The processes serving `ports` (or the given pids), with their children."""
    roots = set(explicit)
    if not roots:
        for port in ports:
            roots |= listening_pids(port)
    return descendants(roots)


def memory_mb(pids: Iterable[int]) -> dict[int, dict[str, float]]:
    """Per process: resident (Rss), proportional (Pss: shared pages split between the sharers)
    and private (Private_Clean + Private_Dirty) memory in MiB, from /proc/<pid>/smaps_rollup.
    Workers forked from one loaded parent show a large Rss but a small private share."""
    out: dict[int, dict[str, float]] = {}
    for pid in sorted(pids):
        try:
            text = (PROC / str(pid) / "smaps_rollup").read_text()
        except OSError:
            continue
        kb = {}
        for line in text.splitlines()[1:]:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                kb[name] = int(rest.split()[0])
        out[pid] = {"rss": round(kb.get("Rss", 0) / 1024, 1),
                    "pss": round(kb.get("Pss", 0) / 1024, 1),
                    "private": round((kb.get("Private_Clean", 0)
                                      + kb.get("Private_Dirty", 0)) / 1024, 1)}
    return out
