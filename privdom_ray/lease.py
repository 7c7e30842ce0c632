"""One driver per output folder: a renewed lease with a fencing token.

Two drivers on one folder would train every cell twice and, with secret noise, leave rows
that no longer match the model on disk. So a driver holds a *lease*: the file
``<output>/.driver-lease/<token>.json`` with the highest token. It is taken by creating the
next token's file with ``os.link`` (atomic, and it fails when the file exists, also on NFS):
of several processes taking over the same stale lease exactly one wins, with no
read-then-delete race. The holder renews it (the file's mtime) every ``lease_s / 6`` seconds;
another driver takes it over only when the holder released it, its process is gone (same
host) or it has not renewed it for ``lease_s`` seconds (a paused or unreachable driver).

Every write of a sweep is *fenced* by the token (:func:`check`): the driver's own writes and
those of its trial processes (the token travels with each cell to the trial store). A write
is refused (:class:`Fenced`) when a newer lease exists or the holder has not renewed its
lease for ``WRITE_CUTOFF x lease_s`` seconds, which is before anyone may take it over: a
paused driver's trials stop writing before a second driver can start, and the paused driver
itself notices on resuming (renewal thread, SIGCONT, every write) and stops with exit 2.

Torch-free and Ray-free: the trial store imports it in every trial process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privdom_ray.folder import LEASE_DIR, LEGACY_LOCK

#: seconds without renewal after which another driver may take the lease over
DEFAULT_LEASE_S = 120.0
#: writers stop when the lease is older than this share of ``lease_s`` (before a takeover)
WRITE_CUTOFF = 0.75


class LockHeld(RuntimeError):
    """Another live driver works on the same output folder."""


class Fenced(RuntimeError):
    """This process's driver no longer holds the output folder's lease: nothing may be written."""


def lease_seconds() -> float:
    """``PRIVDOM_DRIVER_LEASE_S`` (tests, slow shared storage), else the default."""
    return float(os.environ.get("PRIVDOM_DRIVER_LEASE_S", DEFAULT_LEASE_S))


@dataclass(frozen=True)
class Holder:
    """A lease file: who took it, and when it was last renewed (the file's mtime)."""

    token: int
    path: Path
    run_id: str
    host: str
    pid: int
    started: float
    lease_s: float
    renewed: float

    def silent_for(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.renewed

    def stale(self) -> bool:
        """May be taken over: released, its process gone (same host), or silent too long."""
        if self.renewed <= 0 or self.silent_for() > self.lease_s:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except (PermissionError, OverflowError, ValueError):
                return False
        return False

    def describe(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.started))
        return (
            f"host {self.host}, pid {self.pid}, run {self.run_id}, started {started}, "
            f"lease renewed {self.silent_for():.0f} s ago"
        )


def _name(token: int) -> str:
    return f"{token:012d}.json"


def _tokens(folder: Path) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _read(path: Path, token: int) -> Holder | None:
    """The lease file ``path``; opening it first makes NFS revalidate its attributes."""
    try:
        with open(path, "rb") as f:
            renewed = os.fstat(f.fileno()).st_mtime
            data = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data, renewed = {}, 0.0  # unreadable: treated as released
    return Holder(
        token=token, path=path, run_id=str(data.get("run_id", "?")),
        host=str(data.get("host", "?")), pid=int(data.get("pid", -1)),
        started=float(data.get("started", 0.0)), lease_s=float(data.get("lease_s", 0.0)),
        renewed=renewed,
    )  # fmt: skip


def current(output: Path) -> Holder | None:
    """The newest lease of ``output`` (live or not), or None when no driver ever held one."""
    folder = Path(output) / LEASE_DIR
    for token in reversed(_tokens(folder)):
        holder = _read(folder / _name(token), token)
        if holder is not None:
            return holder
    return None


def check(output: Path, token: int) -> None:
    """Raise :class:`Fenced` unless lease ``token`` is the newest and was renewed recently.

    Called before every write of a sweep (driver and trial processes); costs a directory
    listing and one small read.
    """
    folder = Path(output) / LEASE_DIR
    tokens = _tokens(folder)
    newest = tokens[-1] if tokens else None
    if newest != token:
        other = _read(folder / _name(newest), newest) if newest is not None else None
        who = f" by {other.describe()}" if other else ""
        raise Fenced(
            f"{output}: this sweep's lease {token} was taken over{who}; nothing more is written"
        )
    mine = _read(folder / _name(token), token)
    if mine is None or mine.renewed <= 0:
        raise Fenced(f"{output}: this sweep's lease {token} was released; nothing more is written")
    if mine.silent_for() > WRITE_CUTOFF * mine.lease_s:
        raise Fenced(
            f"{output}: the driver has not renewed its lease for {mine.silent_for():.0f} s (paused "
            f"or unreachable; another driver may take over after {mine.lease_s:.0f} s); nothing "
            "more is written"
        )


def _legacy_holder(output: Path) -> str:
    """A live lock of privdom-ray before leases (``driver.lock``), described; else ''."""
    path = Path(output) / LEGACY_LOCK
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    if time.time() - float(data.get("updated", 0)) > DEFAULT_LEASE_S:
        return ""
    if data.get("host") == socket.gethostname():
        try:
            os.kill(int(data.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError, OverflowError):
            return ""
        except PermissionError:
            pass
    return f"host {data.get('host')}, pid {data.get('pid')}, run {data.get('run_id')}"


class Lease:
    """The lease this driver holds on an output folder (see the module docstring)."""

    def __init__(self, output: Path, token: int, run_id: str, lease_s: float) -> None:
        self.output = Path(output)
        self.token = token
        self.run_id = run_id
        self.lease_s = lease_s
        self.path = self.output / LEASE_DIR / _name(token)
        self.took_over: Holder | None = None
        self._renewed = time.monotonic()

    @classmethod
    def acquire(cls, output: Path, run_id: str, lease_s: float | None = None) -> Lease:
        """Take the folder's lease, or raise :class:`LockHeld` naming the live holder."""
        lease_s = lease_seconds() if lease_s is None else lease_s
        folder = Path(output) / LEASE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        legacy = _legacy_holder(Path(output))
        if legacy:
            raise LockHeld(_held_message(Path(output), legacy, lease_s))
        holder = current(output)
        if holder is not None and not holder.stale():
            raise LockHeld(_held_message(Path(output), holder.describe(), holder.lease_s))
        token = (holder.token if holder else 0) + 1
        body = {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.time(), "lease_s": lease_s, "token": token,
        }  # fmt: skip
        tmp = folder / f".{token}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp.write_text(json.dumps(body))
        try:
            os.link(tmp, folder / _name(token))  # atomic: exactly one process creates it
        except FileExistsError:
            winner = _read(folder / _name(token), token)
            raise LockHeld(
                _held_message(Path(output), winner.describe() if winner else "?", lease_s)
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        lease = cls(Path(output), token, run_id, lease_s)
        lease.took_over = holder if holder is not None and holder.renewed > 0 else None
        lease._forget_old()
        return lease

    def _forget_old(self) -> None:
        """Remove leases older than the previous one (the two newest tell a fenced driver)."""
        folder = self.path.parent
        for token in _tokens(folder):
            if token < self.token - 1:
                (folder / _name(token)).unlink(missing_ok=True)
        for tmp in folder.glob(".*.tmp"):  # another process's, which may vanish meanwhile
            with contextlib.suppress(FileNotFoundError):
                if time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise :class:`Fenced` if this driver lost its lease (see :func:`check`); also when
        this process itself could not renew it for longer than the lease (it was paused)."""
        check(self.output, self.token)  # taken over (naming the new holder), or not renewed
        gap = time.monotonic() - self._renewed
        if gap > self.lease_s:
            raise Fenced(
                f"{self.output}: this driver was paused or unresponsive for {gap:.0f} s, longer "
                f"than its {self.lease_s:.0f} s lease; another driver may own the folder now"
            )

    def renew(self) -> None:
        self.check()
        os.utime(self.path)
        self._renewed = time.monotonic()

    def release(self) -> None:
        """Mark the lease released (mtime 0): the next driver takes over at once."""
        try:
            check(self.output, self.token)
        except Fenced:
            return  # not ours any more: leave the new holder's lease alone
        os.utime(self.path, (0, 0))

    def keep_renewed(self, on_lost: Callable[[Fenced], None]) -> Callable[[], None]:
        """Renew from a daemon thread until the returned function is called; ``on_lost`` is
        called (from that thread) when the lease turns out to be lost."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.lease_s / 6):
                try:
                    self.renew()
                except Fenced as exc:
                    on_lost(exc)
                    return

        threading.Thread(target=run, name="driver-lease", daemon=True).start()
        return stop.set


def _held_message(output: Path, who: str, lease_s: float) -> str:
    return (
        f"another driver is running a sweep in {output} ({who}); wait for it to finish, or "
        f"stop it. A killed driver's lease is taken over at once when its process is gone "
        f"(same host), else after {lease_s:.0f} s without renewal."
    )
