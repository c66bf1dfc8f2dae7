"""LiveKit's one-process-per-job worker: the shared PROMETHEUS_MULTIPROC_DIR (created, or
fallen back from), dead-process reaping, the monitor snapshot files that let the ops app show
every job process's window, and the exemplar files that link /metrics to job processes' traces.

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
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import Metric
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

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
    """The shared metrics directory when multiprocess mode is on (LiveKit's convention); None
    also when this process found it unusable and keeps its metrics in-process."""
    if _unusable_dir is not None:
        return None
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return path or None


def values_are_file_backed() -> bool:
    """Whether prometheus_client keeps this process's values in the shared directory's files
    (decided when prometheus_client was imported)."""
    return prometheus_values.ValueClass is not prometheus_values.MutexValue


_unusable_dir: str | None = None  # set once this process fell back to in-process values
_dir_checked_pid = 0
_dir_lock = threading.Lock()


def ensure_multiproc_dir() -> bool:
    """Make file-backed metrics safe to create in this process: create a missing
    PROMETHEUS_MULTIPROC_DIR; if it cannot be created or written, fall back to in-process
    values with one warning. True when this process shares its metrics. Never raises."""
    global _unusable_dir, _dir_checked_pid
    if not values_are_file_backed():
        return False
    pid = os.getpid()
    if _dir_checked_pid == pid:
        return _unusable_dir is None
    with _dir_lock:
        if _dir_checked_pid == pid:
            return _unusable_dir is None
        path = multiproc_dir() or ""
        try:
            if not path:
                raise FileNotFoundError("the variable is empty or unset")
            os.makedirs(path, exist_ok=True)
            # os.access trusts mode bits; a real file also catches read-only mounts and quotas
            fd, probe = tempfile.mkstemp(prefix=".lk_observe_probe_", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            # every file-backed metric created from now on would raise into the agent
            prometheus_values.ValueClass = prometheus_values.MutexValue
            _unusable_dir = path
            logger.warning(
                "%s=%r cannot be used (%s: %s); lk_observe keeps this process's metrics "
                "in-process, so they are not shared with the worker's /metrics. Create the "
                "directory, writable by the agent, before the worker starts.",
                MULTIPROC_ENV,
                path,
                type(exc).__name__,
                exc.strerror or exc,
            )
        _dir_checked_pid = pid
        return _unusable_dir is None


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


class _ThrottledWriter:
    """A file one process rewrites for the ops app: `notify` only flags a change; a daemon
    thread calls `write` at most every `min_interval_s` (a trailing write included, so the last
    change of a burst is not stranded); `close` stops it and writes once more (final=True) if
    anything was ever written or is pending. Subclasses write temp-then-os.replace, so a reader
    never sees half a file. No fsync: the crash that matters is the process's, and the page
    cache outlives it."""

    _thread_name = "lk-observe-writer"
    _what = "file"  # for the failure log line

    def __init__(self, directory: str, file_stem: str, min_interval_s: float) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"{file_stem}_{self.pid}.json")
        self._temp = os.path.join(directory, f".{file_stem}_{self.pid}.json.tmp")
        self._write_lock = threading.Lock()
        self.last_bytes = 0
        self._min_interval_s = min_interval_s
        self._cond = threading.Condition()
        self._dirty = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.failures = 0

    def notify(self, turn: Turn | None = None) -> None:
        """Something changed: write within min_interval_s. Cheap; never blocks on I/O."""
        del turn
        with self._cond:
            if self._closed:
                return
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and write the final file (if anything was ever recorded)."""
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
        raise NotImplementedError

    def _replace_file(self, data: bytes) -> int:
        """Write `data` to a temporary file and rename it over the file: whole or not at all.
        Call it holding `_write_lock`."""
        os.makedirs(self.directory, exist_ok=True)
        with open(self._temp, "wb") as file:
            file.write(data)
        os.replace(self._temp, self.path)
        self.writes += 1
        self.last_bytes = len(data)
        return len(data)

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
            logger.warning("lk_observe could not write a %s", self._what, exc_info=True)


class SnapshotWriter(_ThrottledWriter):
    """Writes one process's monitor window (and its last few turns) for the ops app to merge.

    `notify` is a turn sink (see _ThrottledWriter for the thread). `close` writes a final
    snapshot under a ".final" name that readers keep counting until its slices expire.
    """

    _thread_name = "lk-observe-snapshot"
    _what = "monitor snapshot"

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
        super().__init__(directory, "monitor", min_interval_s)
        self.monitor = monitor
        self._recent = recent
        self._max_bytes = max_bytes
        self._recent_turns = recent_turns
        self._finalized = False
        self.truncated = 0  # series left out of size-capped snapshots, in total
        self._warned_at = -math.inf

    def write(self, *, final: bool = False, timeout_s: float = -1) -> int:
        """Write the snapshot now; its size in bytes (0 when skipped). Blocking: off the loop."""
        if not self._write_lock.acquire(timeout=timeout_s):
            raise TimeoutError("a snapshot write is stuck")
        try:
            if self._finalized:
                return 0
            written = self._replace_file(self._encode(final))
            if final:
                # A rename keeps the file under one name at any moment: never counted twice.
                final_name = f"monitor_{self.pid}.{time.time_ns()}.final.json"
                os.replace(self.path, os.path.join(self.directory, final_name))
                self._finalized = True
            return written
        finally:
            self._write_lock.release()

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


class _FileInfo(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def size(self) -> int: ...


_FileT = TypeVar("_FileT", bound=_FileInfo)
_ParsedT = TypeVar("_ParsedT")
_FileKey = tuple[str, int, int]  # path, mtime_ns, size: a file that changed is a new key


def _read_through(
    files: Iterable[_FileT],
    cache: dict[_FileKey, _ParsedT | str],
    load: Callable[[str], _ParsedT | str | None],
    skip: Callable[[str, str], None],
    *,
    max_total_bytes: int,
    max_cached_bytes: int,
) -> tuple[dict[_FileKey, _ParsedT | str], list[tuple[_FileT, _ParsedT]]]:
    """Each file's parsed content, reading only files changed since the last call (`cache`),
    at most `max_total_bytes` of them; why a file is skipped goes to `skip(reason, path)`.
    Returns the cache for the next call (files of this listing only) and what parsed."""
    budget, cached_bytes = max_total_bytes, 0
    kept: dict[_FileKey, _ParsedT | str] = {}
    parsed: list[tuple[_FileT, _ParsedT]] = []
    for file in files:
        key = (file.path, file.mtime_ns, file.size)
        entry = cache.get(key)
        if entry is None:
            if budget < file.size:
                skip("over_limit", file.path)
                continue
            budget -= file.size
            entry = load(file.path)
            if entry is None:
                continue  # gone meanwhile
        if cached_bytes + file.size <= max_cached_bytes:
            kept[key] = entry
            cached_bytes += file.size
        if isinstance(entry, str):
            skip(entry, file.path)
        else:
            parsed.append((file, entry))
    return kept, parsed


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
        # a file unchanged since the last merge (every final one, most live ones at the page's
        # poll rate) is not read or validated again
        self._parsed, loaded = _read_through(
            self._candidates(),
            self._parsed,
            self._load,
            self._count,
            max_total_bytes=self._max_total_bytes,
            max_cached_bytes=_MAX_CACHED_BYTES,
        )
        for candidate, (series, cleaned) in loaded:
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


# -- exemplars -----------------------------------------------------------------------------------
#
# prometheus_client drops exemplars when values live in the shared files, so the worker's
# /metrics would link no turn to its trace. Each process keeps the latest exemplar per sample
# (metric name, labels, bucket) in memory and rewrites exemplars_<pid>.json at most once a
# second from a daemon thread; render_metrics puts the newest one per sample, across processes,
# on the merged OpenMetrics output. Exemplars stay true after their process ends (its counts stay
# in the .db files), so a dead process's file is kept for EXEMPLAR_RETENTION_S, then deleted.

EXEMPLAR_INTERVAL_S = 1.0
MAX_EXEMPLARS = 1024  # per process, one per sample; the least recently updated goes first
MAX_EXEMPLAR_BYTES = 256 << 10  # per file; 1024 exemplars take about a quarter of it
MAX_EXEMPLAR_FILES = 256  # read per scrape, newest first; dead processes' extra files deleted
MAX_EXEMPLAR_TOTAL_BYTES = 32 << 20  # read per scrape
_MAX_EXEMPLAR_CACHED_BYTES = 8 << 20  # of files whose parsed content the reader keeps
EXEMPLAR_RETENTION_S = 300.0  # a dead process's file, after its last write: several scrapes
_EXEMPLAR_FILE = re.compile(r"^exemplars_(\d{1,10})\.json$")
_EXEMPLAR_TEMP = re.compile(r"^\.exemplars_(\d{1,10})\.json\.tmp$")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: an exemplar carries a trace id, no text
_MAX_NAME = 200  # a sample name or label in an exemplar file; longer ones are not lk_observe's
_MAX_TIMESTAMP = 1e11  # seconds since the epoch: year 5138; larger is not a clock reading

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, le included for buckets
ExemplarKey = tuple[str, Labels]  # (sample name, labels)
KeptExemplar = tuple[str, float, float]  # (trace id, value, unix timestamp)


class ExemplarStore(_ThrottledWriter):
    """This process's latest exemplar per sample, written to `directory` for the ops app.

    `add` runs on the sink thread (a dict update and a notify); the file is written by the
    daemon thread of _ThrottledWriter. Memory and file size are bounded whatever the traffic.
    """

    _thread_name = "lk-observe-exemplars"
    _what = "exemplar file"

    def __init__(
        self,
        directory: str,
        *,
        min_interval_s: float = EXEMPLAR_INTERVAL_S,
        max_entries: int = MAX_EXEMPLARS,
        max_bytes: int = MAX_EXEMPLAR_BYTES,
    ) -> None:
        super().__init__(directory, "exemplars", min_interval_s)
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[ExemplarKey, KeptExemplar] = OrderedDict()
        self._lock = threading.Lock()  # entries: the sink thread adds, the writer thread reads
        self.evicted = 0  # samples whose exemplar made room for a newer sample's
        self.truncated = 0  # exemplars left out of size-capped files, in total

    def add(
        self,
        samples: Iterable[tuple[str, Labels, float]],
        trace_id: str,
        timestamp: float | None = None,
    ) -> None:
        """Record `trace_id` as the exemplar of each (sample name, labels, observed value)."""
        if not _TRACE_ID.fullmatch(trace_id):
            return
        at = time.time() if timestamp is None else timestamp
        with self._lock:
            entries = self._entries
            for name, labels, value in samples:
                if not math.isfinite(value):
                    continue
                key = (name, labels)
                entries[key] = (trace_id, value, at)
                entries.move_to_end(key)
            while len(entries) > self._max_entries:
                entries.popitem(last=False)
                self.evicted += 1
        self.notify()

    def entries(self) -> dict[ExemplarKey, KeptExemplar]:
        """A copy of what this process holds now (the ops app's own turns, fresher than its
        file)."""
        with self._lock:
            return dict(self._entries)

    def write(self, *, final: bool = False, timeout_s: float = -1) -> int:
        """Write the file now; its size in bytes. Blocking: off the loop."""
        del final  # the file keeps its name: readers age a dead process's file out by mtime
        if not self._write_lock.acquire(timeout=timeout_s):
            raise TimeoutError("an exemplar write is stuck")
        try:
            return self._replace_file(self._encode())
        finally:
            self._write_lock.release()

    def _encode(self) -> bytes:
        with self._lock:
            items = list(self._entries.items())
        head = f'{{"v":1,"pid":{self.pid},"exemplars":['
        used = len(head) + 2
        kept: list[str] = []
        for (name, labels), (trace_id, value, at) in reversed(items):  # newest first
            text = _dumps([name, dict(labels), trace_id, value, at])
            if used + len(text) + 1 > self._max_bytes:
                self.truncated += 1
                continue
            kept.append(text)
            used += len(text) + 1
        return f"{head}{','.join(kept)}]}}".encode()


_store: ExemplarStore | None = None
_store_lock = threading.Lock()


def exemplar_store() -> ExemplarStore | None:
    """This process's exemplar store in multiprocess mode (None otherwise)."""
    store = _store
    if store is not None:
        return store
    base = multiproc_dir()
    if base is None:
        return None
    return _make_store(base)


def _make_store(base: str) -> ExemplarStore:
    global _store
    with _store_lock:
        if _store is None:
            _store = ExemplarStore(snapshot_dir(base))
            # also runs when a multiprocessing child (a LiveKit job process) returns
            multiprocessing.util.Finalize(None, _close_store, exitpriority=10)
        return _store


def _close_store() -> None:
    store = _store
    if store is not None and store.pid == os.getpid():
        store.close()


def _forget_store_after_fork() -> None:
    # The child has the parent's exemplars and file name but is another process.
    global _store
    _store = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_store_after_fork)


@dataclass(frozen=True)
class _ExemplarFile:
    path: str
    pid: int
    mtime_ns: int
    size: int


class ExemplarReader:
    """Puts every process's exemplars on the merged samples of a multiprocess /metrics.

    Blocking (file I/O): call it where render_metrics runs, off the loop. Bad files (corrupt,
    truncated, too large, another version) are skipped and counted in `skipped`; files of
    processes dead for over `retention_s`, extra dead ones and dead writers' temp files are
    deleted.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_files: int = MAX_EXEMPLAR_FILES,
        max_bytes: int = MAX_EXEMPLAR_BYTES,
        max_total_bytes: int = MAX_EXEMPLAR_TOTAL_BYTES,
        retention_s: float = EXEMPLAR_RETENTION_S,
    ) -> None:
        self.directory = directory
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._max_total_bytes = max_total_bytes
        self._retention_ns = int(retention_s * 1e9)
        self._lock = threading.Lock()
        self._skipped: dict[str, int] = {}
        self._last_warned: dict[str, float] = {}
        # (path, mtime_ns, size) -> what the file held; only files of the latest listing
        self._parsed: dict[tuple[str, int, int], dict[ExemplarKey, KeptExemplar] | str] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Exemplar files skipped so far, by reason (a copy)."""
        with self._lock:
            return dict(self._skipped)

    def attach(self, families: list[Metric]) -> list[Metric]:
        """`families` (changed in place) with the newest exemplar of each histogram bucket and
        counter total that any process recorded one for. Never raises."""
        with self._lock:
            try:
                self._attach(families)
            except Exception:  # a scrape must answer; at worst without exemplars
                logger.exception("lk_observe could not merge exemplar files")
                self._count("error", self.directory)
        return families

    def prune(self) -> None:
        """Delete what `attach` would (for scrapes that carry no exemplars). Never raises."""
        with self._lock:
            try:
                self._files()
            except Exception:
                logger.exception("lk_observe could not prune exemplar files")

    def _attach(self, families: list[Metric]) -> None:
        wanted: dict[ExemplarKey, tuple[int, int]] = {}  # -> (family index, sample index)
        for f_index, family in enumerate(families):
            suffix = _EXEMPLAR_SUFFIX.get(family.type)
            if suffix is None:
                continue
            for s_index, sample in enumerate(family.samples):
                if sample.name.endswith(suffix):
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    wanted[key] = (f_index, s_index)
        if not wanted:
            return
        newest: dict[ExemplarKey, KeptExemplar] = {}
        sources = self._load_files()
        own = _store
        if own is not None and own.pid == os.getpid():
            sources.append(own.entries())
        for entries in sources:
            for key, kept in entries.items():
                if key in wanted:
                    found = newest.get(key)
                    if found is None or kept[2] > found[2]:
                        newest[key] = kept
        for key, (trace_id, value, at) in newest.items():
            f_index, s_index = wanted[key]
            samples = families[f_index].samples
            samples[s_index] = samples[s_index]._replace(
                exemplar=Exemplar({"trace_id": trace_id}, value, at)
            )

    def _load_files(self) -> list[dict[ExemplarKey, KeptExemplar]]:
        # an unchanged file is not read or parsed again
        self._parsed, loaded = _read_through(
            self._files(),
            self._parsed,
            self._load,
            self._count,
            max_total_bytes=self._max_total_bytes,
            max_cached_bytes=_MAX_EXEMPLAR_CACHED_BYTES,
        )
        return [entries for _, entries in loaded]

    def _load(self, path: str) -> dict[ExemplarKey, KeptExemplar] | str | None:
        """A file's validated exemplars, or why it is skipped (None: gone meanwhile)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError:
            return "unreadable"
        try:
            with os.fdopen(fd, "rb") as file:
                data = file.read(self._max_bytes + 1)
        except OSError:
            return "unreadable"
        if len(data) > self._max_bytes:
            return "too_large"
        try:
            return parse_exemplars(json.loads(data))
        except SnapshotError as exc:
            return exc.reason
        except (ValueError, RecursionError):  # not JSON: truncated, garbage, not UTF-8
            return "corrupt"

    def _files(self) -> list[_ExemplarFile]:
        """Exemplar files worth reading, newest first; deletes what no scrape needs."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError:
            self._count("unreadable", self.directory)
            return []
        own = os.getpid()
        now_ns = time.time_ns()
        live: list[_ExemplarFile] = []
        dead: list[_ExemplarFile] = []
        for name in names:
            path = os.path.join(self.directory, name)
            temp = _EXEMPLAR_TEMP.match(name)
            if temp is not None:
                if not pid_alive(int(temp.group(1))):
                    _remove(path)  # a writer died between write and rename
                continue
            match = _EXEMPLAR_FILE.match(name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == own and _store is not None and _store.pid == own:
                continue  # this process's store is read directly, and fresher
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            found = _ExemplarFile(path, pid, info.st_mtime_ns, info.st_size)
            if pid == own or pid_alive(pid):
                live.append(found)
            elif now_ns - info.st_mtime_ns > self._retention_ns:
                _remove(path)
            else:
                dead.append(found)
        live.sort(key=_newest_file_first)
        dead.sort(key=_newest_file_first)
        for extra in dead[max(0, self._max_files - len(live)) :]:
            _remove(extra.path)  # disk stays bounded however fast jobs come and go
        for extra in live[self._max_files :]:
            self._count("over_limit", extra.path)
        kept = live[: self._max_files] + dead[: max(0, self._max_files - len(live))]
        kept.sort(key=_newest_file_first)
        return kept

    def _count(self, reason: str, path: str) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        now = time.monotonic()
        last = self._last_warned.get(reason)
        if last is not None and now - last < _WARN_EVERY_S:
            return
        self._last_warned[reason] = now
        logger.warning("lk_observe skipped exemplar file %s (%s)", path, reason)


_EXEMPLAR_SUFFIX = {"histogram": "_bucket", "counter": "_total"}  # where OpenMetrics allows them


def _newest_file_first(found: _ExemplarFile) -> int:
    return -found.mtime_ns


def parse_exemplars(state: object) -> dict[ExemplarKey, KeptExemplar]:
    """An exemplar file's content, validated; raises SnapshotError("corrupt"/"incompatible")."""
    if not isinstance(state, dict):
        raise SnapshotError("corrupt", "not a JSON object")
    if state.get("v") != 1:
        raise SnapshotError("incompatible", "another exemplar file version")
    rows = state.get("exemplars")
    if not isinstance(rows, list) or len(rows) > 2 * MAX_EXEMPLARS:
        raise SnapshotError("corrupt", "bad exemplar list")
    found: dict[ExemplarKey, KeptExemplar] = {}
    for row in rows:
        if not isinstance(row, list) or len(row) != 5:
            raise SnapshotError("corrupt", "bad exemplar row")
        name, labels, trace_id, value, at = row
        if not (isinstance(name, str) and len(name) <= _MAX_NAME and isinstance(labels, dict)):
            raise SnapshotError("corrupt", "bad sample name or labels")
        if len(labels) > 8 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= _MAX_NAME
            for k, v in labels.items()
        ):
            raise SnapshotError("corrupt", "bad labels")
        if not (isinstance(trace_id, str) and _TRACE_ID.fullmatch(trace_id)):
            raise SnapshotError("corrupt", "not a trace id")
        if not (_is_number(value) and _is_number(at) and 0 < at < _MAX_TIMESTAMP):
            raise SnapshotError("corrupt", "bad value or timestamp")
        found[(name, tuple(sorted(labels.items())))] = (trace_id, float(value), float(at))
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ExemplarCollector:
    """A collector's families with the processes' exemplars put on (for OpenMetrics only:
    the text format has no place for them)."""

    def __init__(self, collector: Collector, reader: ExemplarReader) -> None:
        self._collector = collector
        self._reader = reader

    def collect(self) -> list[Metric]:
        return self._reader.attach(list(self._collector.collect()))


_readers: dict[str, ExemplarReader] = {}
_readers_lock = threading.Lock()


def exemplar_reader(base: str) -> ExemplarReader:
    """The reader of `base` (PROMETHEUS_MULTIPROC_DIR): one per directory, so its cache of
    unchanged files lasts between scrapes."""
    directory = snapshot_dir(base)
    with _readers_lock:
        reader = _readers.get(directory)
        if reader is None:
            if len(_readers) >= 4:  # the variable changed: the old directories are done
                _readers.clear()
            reader = _readers[directory] = ExemplarReader(directory)
        return reader
