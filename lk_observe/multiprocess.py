"""LiveKit's one-process-per-job worker: the shared PROMETHEUS_MULTIPROC_DIR, dead-process
reaping, and the monitor snapshot files that let the ops app show every job process's window.

LiveKit runs each job in its own process; the ops app runs in the worker's main process and
its own monitor sees no turns. Each process that records turns writes its window (live slices,
sparse bucket counts, count/sum/min/max, slice ids) to
$PROMETHEUS_MULTIPROC_DIR/lk_observe/monitor_<pid>.json at most once a second; the app adds
them up bucket by bucket, which is exact: merged counts equal one monitor fed every sample.
Slice ids come from time.monotonic, one clock for every process of a host (the directory is
per host anyway: prometheus_client's mmap files need that too).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import multiprocessing.util
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

from lk_observe.monitor import (
    MAX_NAME_LENGTH,
    LatencyMonitor,
    MergedMonitor,
    SnapshotError,
    SnapshotPart,
    parse_snapshot,
)
from lk_observe.recent import RecentTurns, default_recent_turns, parse_turn_summary, turn_summary
from lk_observe.turns import Turn

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the variable LiveKit's worker sets too
_WARN_EVERY_S = 60.0  # one log line per skip reason per minute

# -- the shared directory and dead processes ----------------------------------------------------


def multiproc_dir() -> str | None:
    """The shared metrics directory when multiprocess mode is on (LiveKit's convention)."""
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return path or None


def values_are_file_backed() -> bool:
    """Whether prometheus_client keeps this process's values in the shared directory's files
    (decided when prometheus_client was imported)."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


def warn_if_misconfigured() -> None:
    # prometheus_client picks file-backed values at import time; setting the variable later
    # silently leaves this process's metrics out of every multiprocess /metrics.
    if multiproc_dir() and not values_are_file_backed():
        logger.warning(
            "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported; "
            "this process's metrics are not shared. Set it before the worker starts."
        )


_exit_cleanup_registered = False


def register_exit_cleanup() -> None:
    # multiprocessing.util finalizers run both at interpreter exit and when a
    # multiprocessing child (LiveKit's job process) returns, which skips atexit (os._exit).
    global _exit_cleanup_registered
    if _exit_cleanup_registered or not multiproc_dir():
        return
    _exit_cleanup_registered = True
    multiprocessing.util.Finalize(None, _mark_this_process_dead, exitpriority=10)


def _mark_this_process_dead() -> None:
    try:
        mark_process_dead(os.getpid())
    except Exception:
        logger.debug("could not clean up live gauges at exit", exc_info=True)


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop a finished process's live gauges (active sessions) from the aggregate."""
    directory = path or multiproc_dir()
    if directory:
        prometheus_multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def pid_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # A SIGKILLed child stays a zombie until its parent reaps it: that is dead too.
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str | None = None) -> list[int]:
    """mark_process_dead for every process that left live gauges behind and is gone (SIGKILL,
    OOM kill): nothing else runs for those, and LiveKit's pool does not call it either."""
    directory = path or multiproc_dir()
    if not directory:
        return []
    reaped: list[int] = []
    pids: set[int] = set()
    for file in glob.glob(os.path.join(directory, "gauge_live*.db")):
        match = _LIVE_GAUGE_FILE.match(os.path.basename(file))
        if match:
            pids.add(int(match.group(1)))
    for pid in sorted(pids):
        if pid != os.getpid() and not pid_alive(pid):
            mark_process_dead(pid, directory)
            reaped.append(pid)
    return reaped


# -- monitor snapshots --------------------------------------------------------------------------


SNAPSHOT_DIRNAME = "lk_observe"
MAX_SNAPSHOT_BYTES = 1 << 20  # per process; a larger snapshot drops per-agent series first
MAX_SNAPSHOT_FILES = 256  # read per merge, newest first
MAX_SNAPSHOT_TOTAL_BYTES = 64 << 20  # read per merge
_MAX_CACHED_BYTES = 16 << 20  # of files whose parsed content the reader keeps between merges
SNAPSHOT_RECENT_TURNS = 20  # per process
SNAPSHOT_INTERVAL_S = 1.0
_LIVE_FILE = re.compile(r"^monitor_(\d{1,10})\.json$")
# A cleanly exited process renames its last snapshot: it counts until its slices expire.
_FINAL_FILE = re.compile(r"^monitor_(\d{1,10})\.(\d{1,20})\.final\.json$")
_TEMP_FILE = re.compile(r"^\.monitor_(\d{1,10})\.json\.tmp$")


def snapshot_dir(base: str) -> str:
    """Where processes leave their monitor snapshots, under PROMETHEUS_MULTIPROC_DIR."""
    return os.path.join(base, SNAPSHOT_DIRNAME)


class SnapshotWriter:
    """Writes one process's monitor window (and its last few turns) for the ops app to merge.

    `notify` is a turn sink: it only flags the change. A daemon thread writes at most every
    `min_interval_s` (a trailing write included, so the last turn of a burst is not stranded)
    with write-temp-then-os.replace, so a reader never sees half a file. No fsync: the crash
    that matters is the process's, and the page cache outlives it. `close` writes a final
    snapshot under a ".final" name that readers keep counting until its slices expire.
    """

    def __init__(
        self,
        monitor: LatencyMonitor,
        directory: str,
        *,
        recent: RecentTurns | None = None,
        min_interval_s: float = SNAPSHOT_INTERVAL_S,
        max_bytes: int = MAX_SNAPSHOT_BYTES,
        recent_turns: int = SNAPSHOT_RECENT_TURNS,
    ) -> None:
        self.monitor = monitor
        self.directory = directory
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"monitor_{self.pid}.json")
        self._temp = os.path.join(directory, f".monitor_{self.pid}.json.tmp")
        self._recent = recent
        self._min_interval_s = min_interval_s
        self._max_bytes = max_bytes
        self._recent_turns = recent_turns
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._dirty = False
        self._closed = False
        self._finalized = False
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.failures = 0
        self.truncated = 0  # series left out of size-capped snapshots, in total
        self.last_bytes = 0
        self._warned_at = -math.inf

    def notify(self, turn: Turn | None = None) -> None:
        """The monitor changed: write within min_interval_s. Cheap; never blocks on I/O."""
        del turn
        with self._cond:
            if self._closed:
                return
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="lk-observe-snapshot", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and write the final snapshot (if anything was ever recorded)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = self._dirty or self.writes > 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if pending:
            self._write_logged(final=True, timeout_s=timeout_s)

    def write(self, *, final: bool = False, timeout_s: float = -1) -> int:
        """Write the snapshot now; its size in bytes (0 when skipped). Blocking: off the loop."""
        if not self._write_lock.acquire(timeout=timeout_s):
            raise TimeoutError("a snapshot write is stuck")
        try:
            if self._finalized:
                return 0
            data = self._encode(final)
            os.makedirs(self.directory, exist_ok=True)
            with open(self._temp, "wb") as file:
                file.write(data)
            os.replace(self._temp, self.path)
            if final:
                # A rename keeps the file under one name at any moment: never counted twice.
                final_name = f"monitor_{self.pid}.{time.time_ns()}.final.json"
                os.replace(self.path, os.path.join(self.directory, final_name))
                self._finalized = True
            self.writes += 1
            self.last_bytes = len(data)
            return len(data)
        finally:
            self._write_lock.release()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._dirty = False
            self._write_logged(final=False)
            with self._cond:  # throttle; close() cuts the wait short
                self._cond.wait_for(lambda: self._closed, self._min_interval_s)

    def _write_logged(self, *, final: bool, timeout_s: float = -1) -> None:
        try:
            self.write(final=final, timeout_s=timeout_s)
        except Exception:  # a full disk costs the ops app this process's numbers, nothing more
            self.failures += 1
            logger.warning("lk_observe could not write a monitor snapshot", exc_info=True)

    def _encode(self, final: bool) -> bytes:
        state = self.monitor.snapshot()
        series: list[dict[str, Any]] = state.pop("series")
        state.update(pid=self.pid, final=final, written_at=time.time())
        recent_json = "[]"
        if self._recent is not None and self._recent_turns > 0:
            summaries = []
            for turn in self._recent.turns()[-self._recent_turns :]:
                # the reader's own check: one odd turn must not get the whole file refused
                with contextlib.suppress(ValueError):
                    summaries.append(parse_turn_summary(turn_summary(turn)))
            try:
                recent_json = _dumps(summaries)
            except ValueError:  # NaN in a turn: the page loses those turns, not the numbers
                recent_json = "[]"
            if len(recent_json) > self._max_bytes // 4:
                recent_json = "[]"
        head = _dumps(state)
        used = len(head) + len(recent_json) + 64
        kept: list[str] = []
        dropped = 0
        for entry in series:  # aggregates first: dropping from the end loses per-agent views
            text = _dumps(entry)
            too_long = len(entry["c"]) > MAX_NAME_LENGTH or len(entry["a"] or "") > MAX_NAME_LENGTH
            if too_long or used + len(text) + 1 > self._max_bytes:
                dropped += 1
                continue
            kept.append(text)
            used += len(text) + 1
        if dropped:
            self.truncated += dropped
        if dropped and time.monotonic() - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = time.monotonic()
            logger.warning(
                "lk_observe snapshot: %d series left out (over %d bytes or names over %d chars)",
                dropped,
                self._max_bytes,
                MAX_NAME_LENGTH,
            )
        # head is a non-empty object: splice the big lists in without re-encoding them
        series_json = ",".join(kept)
        body = (
            f'{head[:-1]},"truncated":{dropped},"series":[{series_json}],"recent":{recent_json}}}'
        )
        return body.encode()


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


_writer: SnapshotWriter | None = None
_writer_lock = threading.Lock()
_writer_mismatch_logged = False


def snapshot_writer(monitor: LatencyMonitor) -> SnapshotWriter | None:
    """This process's writer when PROMETHEUS_MULTIPROC_DIR is set (else None), bound to the
    first monitor it is asked for: one file per process holds one monitor."""
    global _writer, _writer_mismatch_logged
    base = multiproc_dir()
    if base is None:
        return None
    with _writer_lock:
        if _writer is None:
            _writer = SnapshotWriter(monitor, snapshot_dir(base), recent=default_recent_turns())
            # also runs when a multiprocessing child (a LiveKit job process) returns
            multiprocessing.util.Finalize(None, _close_writer, exitpriority=10)
        if _writer.monitor is monitor:
            return _writer
        if not _writer_mismatch_logged:
            _writer_mismatch_logged = True
            logger.warning(
                "lk_observe shares one monitor per process with the ops app; "
                "turns recorded into another monitor stay in this process"
            )
        return None


def snapshot_sinks(monitor: LatencyMonitor) -> list[tuple[str, Callable[[Turn], None]]]:
    """The turn sinks that share `monitor` with the ops app ([] outside multiprocess mode)."""
    writer = snapshot_writer(monitor)
    return [] if writer is None else [("snapshot", writer.notify)]


def _close_writer() -> None:
    writer = _writer
    if writer is not None and writer.pid == os.getpid():
        writer.close()


def _forget_writer_after_fork() -> None:
    # The child has the parent's writer object but not its thread, and another pid.
    global _writer
    _writer = None


if hasattr(os, "register_at_fork"):  # POSIX only; nothing forks elsewhere
    os.register_at_fork(after_in_child=_forget_writer_after_fork)


@dataclass(frozen=True)
class MergedView:
    """What the ops app shows in multiprocess mode."""

    monitor: MergedMonitor
    recent: list[dict[str, Any]]  # turn summaries, oldest first
    processes: int  # other processes' snapshots merged in


@dataclass(frozen=True)
class _Candidate:
    path: str
    pid: int
    final: bool
    mtime_ns: int
    size: int


# a snapshot file's validated series and recent turns
_Parsed = tuple[list[tuple[str, str | None, list[SnapshotPart]]], list[dict[str, Any]]]


class SnapshotReader:
    """Merges a monitor with the snapshots other processes left in `directory`.

    Blocking (file I/O): call `view()` from a worker thread. Results are cached for
    `max_age_s`, so the page's simultaneous requests share one merge. Bad files (corrupt,
    truncated, too large, another version or window) are skipped and counted in `skipped`.
    Files of dead processes that did not exit cleanly are deleted, as are expired final files.
    """

    def __init__(
        self,
        monitor: LatencyMonitor,
        directory: str,
        *,
        recent: RecentTurns | None = None,
        max_age_s: float = 0.5,
        max_files: int = MAX_SNAPSHOT_FILES,
        max_bytes: int = MAX_SNAPSHOT_BYTES,
        max_total_bytes: int = MAX_SNAPSHOT_TOTAL_BYTES,
        recent_turns: int = 50,
    ) -> None:
        self.monitor = monitor
        self.directory = directory
        self._recent = recent
        self._max_age_s = max_age_s
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._max_total_bytes = max_total_bytes
        self._recent_turns = recent_turns
        self._lock = threading.Lock()
        self._cached: MergedView | None = None
        self._cached_at = -math.inf
        self._skipped: dict[str, int] = {}
        self._last_warned: dict[str, float] = {}
        # (path, mtime_ns, size) -> what the file held; only files of the latest listing
        self._parsed: dict[tuple[str, int, int], _Parsed | str] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Snapshot files skipped so far, by reason (a copy)."""
        with self._lock:
            return dict(self._skipped)

    def view(self) -> MergedView:
        """This process's monitor plus every live process's snapshot. Never raises."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached_at < self._max_age_s:
                return self._cached
            try:
                view = self._merge()
            except Exception:  # the ops app must answer; at worst with this process alone
                logger.exception("lk_observe could not merge monitor snapshots")
                self._count("error", self.directory)
                view = self._merge_own()
            self._cached, self._cached_at = view, time.monotonic()
            return view

    def _merge_own(self) -> MergedView:
        merged = MergedMonitor.like(self.monitor)
        merged.merge(self.monitor.snapshot())
        recent = [] if self._recent is None else [turn_summary(t) for t in self._recent.turns()]
        return MergedView(merged, recent[-self._recent_turns :], 0)

    def _merge(self) -> MergedView:
        own = self._merge_own()
        merged, recent = own.monitor, own.recent
        processes = 0
        budget = self._max_total_bytes
        parsed_before, self._parsed = self._parsed, {}
        cached_bytes = 0
        for candidate in self._candidates():
            key = (candidate.path, candidate.mtime_ns, candidate.size)
            # A file unchanged since the last merge (every final one, most live ones at the
            # page's poll rate) is not read or validated again.
            entry = parsed_before.get(key)
            if entry is None:
                if budget < candidate.size:
                    self._count("over_limit", candidate.path)
                    continue
                budget -= candidate.size
                entry = self._load(candidate.path)
                if entry is None:
                    continue
            if cached_bytes + candidate.size <= _MAX_CACHED_BYTES:
                self._parsed[key] = entry
                cached_bytes += candidate.size
            if isinstance(entry, str):
                self._count(entry, candidate.path)
                continue
            series, cleaned = entry
            try:
                merged.merge_parsed(series)
            except SnapshotError as exc:
                self._count(exc.reason, candidate.path)
                continue
            recent.extend(cleaned)
            processes += 1
        recent.sort(key=_ended_at)
        return MergedView(merged, recent[-self._recent_turns :], processes)

    def _load(self, path: str) -> _Parsed | str | None:
        """A file's validated content, or why it is skipped (None: gone meanwhile)."""
        data = self._read(path)
        if data is None:
            return None
        if len(data) > self._max_bytes:
            return "too_large"
        try:
            state = json.loads(data)
            if not isinstance(state, dict):
                raise SnapshotError("corrupt", "not a JSON object")
            summaries = state.get("recent", [])
            if not isinstance(summaries, list) or len(summaries) > 4 * SNAPSHOT_RECENT_TURNS:
                raise SnapshotError("corrupt", "bad recent list")
            cleaned = [parse_turn_summary(raw) for raw in summaries]
            series = parse_snapshot(state, self.monitor.window_s, self.monitor.slices)
        except SnapshotError as exc:
            return exc.reason
        except (ValueError, RecursionError):  # not JSON: truncated, garbage, not UTF-8
            return "corrupt"
        return series, cleaned

    def _candidates(self) -> list[_Candidate]:
        """Snapshots worth reading, newest first; deletes those of dead or long-gone processes."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError:
            self._count("unreadable", self.directory)
            return []
        own = os.getpid()
        wall_ns = time.time_ns()
        # after this long a file holds no live slice (mtime is its last write)
        horizon_ns = int((self.monitor.window_s * (1 + 1 / self.monitor.slices) + 1) * 1e9)
        found: list[_Candidate] = []
        for name in names:
            path = os.path.join(self.directory, name)
            temp = _TEMP_FILE.match(name)
            if temp is not None:
                if not pid_alive(int(temp.group(1))):
                    _remove(path)  # a writer died between write and rename
                continue
            live, final = _LIVE_FILE.match(name), _FINAL_FILE.match(name)
            match = live or final
            if match is None:
                continue
            pid = int(match.group(1))
            if live is not None and pid == own:
                continue  # this process's monitor is merged directly, and fresher
            try:
                info = os.lstat(path)
            except OSError:
                continue  # renamed or deleted meanwhile
            if not stat.S_ISREG(info.st_mode):
                continue
            expired = wall_ns - info.st_mtime_ns > horizon_ns
            if final is not None:
                if expired:
                    _remove(path)
                    continue
            elif not pid_alive(pid):
                # killed without a goodbye (no final snapshot): drop it, as /metrics drops its
                # live gauges; its turns are in Prometheus counters, not in this window
                _remove(path)
                self._count("dead", path)
                continue
            elif expired:
                self._count("stale", path)
                continue
            found.append(_Candidate(path, pid, final is not None, info.st_mtime_ns, info.st_size))
        # mid-rename a process can show under both names: the final one wins
        finals = {c.pid: c.mtime_ns for c in found if c.final}
        found = [c for c in found if c.final or finals.get(c.pid, -1) < c.mtime_ns]
        found.sort(key=_newest_first)
        for extra in found[self._max_files :]:
            self._count("over_limit", extra.path)
        return found[: self._max_files]

    def _read(self, path: str) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None  # the process exited (renamed to final) or was reaped meanwhile
        except OSError:
            self._count("unreadable", path)
            return None
        try:
            with os.fdopen(fd, "rb") as file:
                data = file.read(self._max_bytes + 1)
        except OSError:
            self._count("unreadable", path)
            return None
        return data  # one byte over max_bytes tells _load it is too large

    def _count(self, reason: str, path: str) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        if reason in ("dead", "stale"):
            return  # routine: processes end
        now = time.monotonic()
        last = self._last_warned.get(reason)
        if last is not None and now - last < _WARN_EVERY_S:
            return
        self._last_warned[reason] = now
        logger.warning("lk_observe skipped monitor snapshot %s (%s)", path, reason)


def _ended_at(summary: dict[str, Any]) -> float:
    return float(summary["ended_at"])


def _newest_first(candidate: _Candidate) -> int:
    return -candidate.mtime_ns


def _remove(path: str) -> None:
    # another reader may have removed it first; a read-only directory leaves it for someone else
    with contextlib.suppress(OSError):
        os.unlink(path)
