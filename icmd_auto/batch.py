"""What an overnight batch of ``predict`` needs beyond predicting: a report, a lock, a share, progress.

- **Report** (MONAI Deploy's one report per run): ``predict_report.json`` and ``predict_report.csv``
  beside the outputs, one row per case: input, series, output, status (written / skipped / failed),
  the reason of a failure in one line, seconds, peak and final resident memory. It is rewritten
  (atomically) before and after every case, so a killed run leaves a report that says which case it
  was in; reading it back, that case and the ones after it count as failed, and ``--resume`` does
  them (as it does every failed and every missing case).
- **Lock**: an ``flock`` on ``.icmd_predict.lock`` in the output folder, with the holder's process
  id, host and start written in it. The kernel releases it when the holder ends, however it ends
  (SIGKILL included), so the next batch takes it over; a second batch on a held folder refuses in
  one line naming the holder. A part of a split batch holds the folder lock shared and its own
  part lock exclusively: parts run side by side, a whole batch and a part do not.
- **Parts** (nnU-Net's ``predict --num_parts --part_id``): the sorted cases ``[part_id::num_parts]``,
  one report per part (``predict_report.part1of4.json``); ``merge_reports`` (``icmd_auto report``)
  joins them, and a later ``--resume`` reads them.
- **Progress**: a bar over cases with ETA on a terminal (the bundle's inferer adds one over a case's
  plane chunks), one plain line per case otherwise (a scheduler's log), nothing with ``--quiet``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import resource
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ICMDError

logger = logging.getLogger("icmd_auto")

REPORT_STEM = "predict_report"
LOCK_NAME = ".icmd_predict.lock"
SCRATCH_PREFIX = ".icmd_batch_"
STATUSES = ("written", "skipped", "failed")
COLUMNS = (
    "input",
    "series",
    "output",
    "status",
    "reason",
    "seconds",
    "peak_memory_mb",
    "rss_mb",
    "finished",
    "previous",
)
# a report names at most this many failures in the command's last message; all are in the report
LISTED_FAILURES = 20


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Part:
    """One share of a batch split over ``count`` machines: the sorted cases ``[id::count]``."""

    id: int = 0
    count: int = 1

    @classmethod
    def of(cls, num_parts, part_id) -> Part:
        try:
            count, index = int(num_parts), int(part_id)
        except (TypeError, ValueError):
            raise ICMDError(f"--num_parts {num_parts} --part_id {part_id}: both are whole numbers") from None
        if count < 1 or not 0 <= index < count:
            raise ICMDError(
                f"--num_parts {num_parts} --part_id {part_id}: the part id is 0 .. num_parts - 1 "
                "(Slurm: --array=0-<num_parts - 1> and --part_id $SLURM_ARRAY_TASK_ID)"
            )
        return cls(index, count)

    @property
    def split(self) -> bool:
        return self.count > 1

    @property
    def tag(self) -> str:
        return f"part{self.id}of{self.count}" if self.split else "all"

    def select(self, items: list) -> list:
        return items[self.id :: self.count]

    def report_path(self, folder: Path) -> Path:
        return folder / (f"{REPORT_STEM}.{self.tag}.json" if self.split else f"{REPORT_STEM}.json")

    def describe(self) -> str:
        return f"part {self.id} of {self.count} (ids 0..{self.count - 1})"


WHOLE = Part()  # a batch not split


@dataclass
class CaseRecord:
    """One case's row of the report."""

    input: str
    output: str
    series: list[str] = field(default_factory=list)
    status: str = "pending"  # then running, then one of STATUSES
    reason: str = ""
    seconds: float | None = None
    peak_memory_mb: float | None = None
    rss_mb: float | None = None
    finished: str | None = None
    previous: str | None = None  # what an earlier run's report said of this case

    def outcome(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status


def _atomic_write(path: Path, text: str) -> None:
    """``text`` to ``path`` whole or not at all (a temporary file beside it, renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class BatchReport:
    """The report of one run (or of one part of a split run), kept on disk as it goes."""

    def __init__(self, path: Path, header: dict, records: list[CaseRecord]):
        self.path, self.header, self.records = path, header, records
        self.started = time.perf_counter()
        self._save_failed = False

    @property
    def csv_path(self) -> Path:
        return self.path.with_suffix(".csv")

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.records) for s in STATUSES}

    def failures(self) -> list[CaseRecord]:
        return [r for r in self.records if r.status == "failed"]

    def content(self) -> dict:
        return {
            **self.header,
            "updated": now(),
            "seconds": round(time.perf_counter() - self.started, 2),
            "counts": self.counts(),
            "cases": [asdict(r) for r in self.records],
        }

    def save(self) -> bool:
        """Write the JSON and the CSV; a failure (a full disk) is a warning, once: the cases go on."""
        try:
            write_report(self.path, self.content())
        except OSError as e:
            if not self._save_failed:
                logger.warning(f"warning: {self.path}: the report cannot be written ({e.strerror or e})")
            self._save_failed = True
            return False
        self._save_failed = False
        return True


def write_report(path: Path, content: dict) -> None:
    """``content`` as ``path`` (JSON) and the same name with .csv, one row per case."""
    _atomic_write(path, json.dumps(content, indent=2) + "\n")
    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for case in content["cases"]:
        writer.writerow({**case, "series": " ".join(case.get("series") or [])})
    _atomic_write(path.with_suffix(".csv"), rows.getvalue())


def report_paths(folder: Path) -> list[Path]:
    """The reports in ``folder``: a whole batch's and each part's."""
    return sorted(folder.glob(f"{REPORT_STEM}.json")) + sorted(folder.glob(f"{REPORT_STEM}.part*of*.json"))


def _read_report(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning(f"warning: {path}: not a readable report, left out ({e})")
        return None
    if not isinstance(content, dict) or not isinstance(content.get("cases"), list):
        logger.warning(f"warning: {path}: not a batch report, left out")
        return None
    return content


def _finished_record(case: dict, report: dict) -> CaseRecord:
    """A case as a report read back says it: a run killed during a case left it 'running' and the
    ones after it 'pending'; both are failures to do again."""
    record = CaseRecord(**{k: case.get(k) for k in CaseRecord.__dataclass_fields__ if k in case})
    record.series = list(record.series or [])
    pid = report.get("pid")
    if record.status == "running":
        record.status = "failed"
        record.reason = f"interrupted: the run (pid {pid}) ended during this case"
        record.finished = record.finished or report.get("updated")
    elif record.status == "pending":
        record.status = "failed"
        record.reason = f"not run: the run (pid {pid}) ended before this case"
        record.finished = record.finished or report.get("updated")
    return record


def _later(a: CaseRecord, b: CaseRecord) -> CaseRecord:
    """Of two records of one case, the one that tells what happened to it: the latest run that
    worked on it (a skip only says that an earlier run wrote it)."""
    if (a.status == "skipped") != (b.status == "skipped"):
        return b if a.status == "skipped" else a
    return b if (b.finished or "") >= (a.finished or "") else a


def earlier_records(folder: Path) -> dict[str, CaseRecord]:
    """What the reports in ``folder`` (a whole batch's and its parts') say of each case, by output."""
    merged: dict[str, CaseRecord] = {}
    for path in report_paths(folder):
        report = _read_report(path)
        for case in report["cases"] if report else ():
            record = _finished_record(case, report)
            merged[record.output] = (
                _later(merged[record.output], record) if record.output in merged else record
            )
    return merged


def merge_reports(folder: str | Path) -> dict:
    """``icmd_auto report OUT_DIR``: the reports in OUT_DIR (each part's, and a whole batch's) merged into
    ``predict_report.json`` / ``.csv``; returns the merged report, with ``missing_parts`` listing the
    parts of a split batch that left no report (their cases were never run)."""
    folder = Path(folder).expanduser().absolute()
    paths = report_paths(folder)
    reports = [(p, r) for p in paths if (r := _read_report(p)) is not None]
    if not reports:
        raise ICMDError(
            f"{folder}: no batch report found ({REPORT_STEM}.json or {REPORT_STEM}.partIofN.json)"
        )
    merged = earlier_records(folder)
    counts = {(r.get("part") or {}).get("count", 1) for _, r in reports}
    seen = {
        (r.get("part") or {}).get("id", 0) for _, r in reports if (r.get("part") or {}).get("count", 1) > 1
    }
    missing = [f"part {i} of {n}" for n in sorted(counts - {1}) for i in range(n) if i not in seen]
    records = sorted(merged.values(), key=lambda r: r.output)
    content = {
        "kind": "icmd_auto predict batch report (merged)",
        "output": str(folder),
        "merged_from": [p.name for p, _ in reports],
        "missing_parts": missing,
        "updated": now(),
        "counts": {s: sum(r.status == s for r in records) for s in STATUSES},
        "cases": [asdict(r) for r in records],
    }
    write_report(folder / f"{REPORT_STEM}.json", content)
    return content


def failure_message(failures: list[CaseRecord], total: int, counts: dict, path: Path) -> str:
    """The command's last words on a batch with failures: the count, the report, how to go on."""
    lines = [f"  - {r.input}: {r.reason}" for r in failures[:LISTED_FAILURES]]
    if len(failures) > LISTED_FAILURES:
        lines.append(f"  ... and {len(failures) - LISTED_FAILURES} more in the report")
    return (
        f"{len(failures)} of {total} case(s) failed ({counts['written']} written, {counts['skipped']} skipped "
        f"as done); report: {path}; re-run with --resume to retry only these:\n" + "\n".join(lines)
    )


class OutputLock:
    """The output folder's lock for one batch (or one part of a split batch); see the module's notes.

    ``flock`` locks belong to the open file, so the kernel drops them when the holder ends: a lock
    file left by a killed run is simply taken. A lock file is removed only by a holder of its
    exclusive lock, and a taker checks that the file it locked is still the one at the path.
    """

    def __init__(self, folder: Path, part: Part = WHOLE):
        self.folder, self.part = Path(folder), part
        self._held: list[tuple[Path, int, bool]] = []  # (path, fd, exclusive)

    def _take(self, path: Path, exclusive: bool) -> bool:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                raise ICMDError(f"{path}: cannot lock the output folder ({e.strerror or e})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed it between our open and our lock: take the new one
                self._held.append((path, fd, exclusive))
                return True
            os.close(fd)

    def _holder(self, path: Path) -> str:
        try:
            h = json.loads(path.read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['started']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its name yet"

    def _held_parts(self) -> list[Path]:
        held = []
        for path in sorted(self.folder.glob(f"{LOCK_NAME[:-5]}.part*of*.lock")):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(path)
                finally:
                    os.close(fd)
        return held

    def _sign(self, path: Path, fd: int) -> None:
        program = (
            "icmd_auto" if sys.argv[0].endswith(("__main__.py", "icmd_auto")) else Path(sys.argv[0]).name
        )
        command = " ".join([program, *sys.argv[1:]])
        signature = {"pid": os.getpid(), "host": socket.gethostname(), "started": now(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(signature).encode(), 0)

    def acquire(self) -> OutputLock:
        folder_lock = self.folder / LOCK_NAME
        busy = "refusing to start a second batch on it (wait for that one, or give another --output)"
        if not self.part.split:
            if not self._take(folder_lock, exclusive=True):
                parts = self._held_parts()
                holder = self._holder(parts[0] if parts else folder_lock)
                what = f"{len(parts)} part(s) of a split batch" if parts else "another batch"
                raise ICMDError(f"{self.folder}: {what} is writing here ({holder}); {busy}")
            self._sign(folder_lock, self._held[-1][1])
            return self
        if not self._take(folder_lock, exclusive=False):
            raise ICMDError(
                f"{self.folder}: another batch is writing here ({self._holder(folder_lock)}); {busy}"
            )
        part_lock = self.folder / f"{LOCK_NAME[:-5]}.{self.part.tag}.lock"
        if not self._take(part_lock, exclusive=True):
            holder = self._holder(part_lock)
            self.release()
            raise ICMDError(f"{self.folder}: {self.part.describe()} is running already ({holder}); {busy}")
        self._sign(part_lock, self._held[-1][1])
        return self

    def release(self) -> None:
        for path, fd, exclusive in reversed(self._held):
            if not exclusive:  # the folder lock of a part: removable once no other part holds it
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    exclusive = True
            if exclusive:
                path.unlink(missing_ok=True)
            os.close(fd)
        self._held = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_scratch(folder: Path, part: Part) -> None:
    """Scratch folders and report temporaries that a killed run of this share left (under its lock,
    no live run owns them; a whole batch owns the whole folder)."""
    own = f"{SCRATCH_PREFIX}{part.tag}_" if part.split else SCRATCH_PREFIX
    for path in folder.glob(f"{own}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    report = part.report_path(folder)
    for name in (report.name, report.with_suffix(".csv").name):
        (folder / f".{name}.tmp").unlink(missing_ok=True)


def disk_full(error: BaseException) -> OSError | None:
    """The no-space (or over-quota) error in ``error``'s chain of causes, if there is one.

    MONAI's SaveImage tries each writer and raises a RuntimeError of its own that carries the
    writers' errors only as text (their tracebacks): that text counts too.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"[Errno {code}]" in str(error):
                return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


class MemoryProbe:
    """Resident memory of this process around one case, in MB.

    ``peak``: the kernel's high-water mark (VmHWM), reset before each case by writing 5 to
    /proc/self/clear_refs, so it is the case's own peak; where that cannot be reset (not Linux,
    or not permitted) it is the process's peak so far (``per_case`` False). ``rss``: VmRSS after
    the case, which stays flat across a batch unless something leaks.
    """

    def __init__(self):
        self.per_case = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.per_case:
            self._reset()

    @staticmethod
    def read() -> tuple[float | None, float | None]:
        try:
            status = dict(
                line.split(":", 1)
                for line in Path("/proc/self/status").read_text().splitlines()
                if ":" in line
            )
            return (int(status["VmHWM"].split()[0]) / 1024, int(status["VmRSS"].split()[0]) / 1024)
        except (OSError, KeyError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None

    def describe(self) -> str:
        return (
            "peak_memory_mb: resident peak during the case (VmHWM, reset before each case); rss_mb: after it"
            if self.per_case
            else "peak_memory_mb: the process's resident peak so far; rss_mb: after the case"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class CaseProgress:
    """Progress over a batch's cases: a tqdm bar with ETA on a terminal, else one line per case
    (``[3/100] scan.nii.gz: written in 4.1 s, peak 812 MB; ETA 6:50``); nothing when quiet."""

    def __init__(self, total: int, quiet: bool = False, terminal: bool | None = None):
        self.total, self.quiet = total, quiet
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done_count, self.seconds = 0, 0.0
        self.bar, self._redirect = None, None

    def __enter__(self) -> CaseProgress:
        if self.terminal and not self.quiet and self.total:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, desc="cases", unit="case", dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm(loggers=[logger])
            self._redirect.__enter__()
        return self

    def done(self, record: CaseRecord, seconds: float) -> None:
        self.done_count += 1
        self.seconds += seconds
        if self.bar is not None:
            self.bar.set_postfix_str(f"{Path(record.input).name}: {record.status}", refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            left = self.total - self.done_count
            eta = f"; ETA {_duration(self.seconds / self.done_count * left)}" if left else ""
            memory = f", peak {record.peak_memory_mb:.0f} MB" if record.peak_memory_mb else ""
            logger.info(
                f"[{self.done_count}/{self.total}] {Path(record.input).name}: {record.status} in "
                f"{seconds:.1f} s{memory}{eta}"
            )

    def __exit__(self, *exc) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()


def unfinished(records: Iterable[CaseRecord], reason_running: str, reason_pending: str) -> None:
    """Close the records a run leaves behind when it stops early (Ctrl-C, a full disk)."""
    for record in records:
        if record.status in ("running", "pending"):
            record.reason = reason_running if record.status == "running" else reason_pending
            record.status = "failed"
            record.finished = now()
