"""One live run per workdir: `WORKDIR/run.lock`, held by process 0 for the whole run.

An advisory `flock` on the file, plus the holder's host, pid and start time written in
it for the message a second start gets. The kernel releases the lock when its holder
dies however it dies (SIGKILL included), so a lock left by a killed run is simply
taken over; the stale holder's details are only logged. On network filesystems Linux
maps `flock` onto the server's byte-range locks (NFSv4), which hold across hosts.
"""

import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging

from mixer_jax import errors

FILE = "run.lock"


class WorkdirLock:
  """`acquire()` or raise `errors.WorkdirError` naming the live holder; `release()`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, FILE)
    self._fd: Optional[int] = None

  def _holder(self, fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
      info = json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
      info = {}
    if not info:
      return "an unknown process"
    return (f"pid {info.get('pid')} on host {info.get('host')}, started "
            f"{info.get('started')}")

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise errors.WorkdirError(
          f"Workdir {self.workdir} is in use by another run ({holder}); wait for it to "
          "finish or stop it, or choose another --workdir.") from None
    stale = self._holder(fd)
    if stale != "an unknown process":
      logging.info("Took over %s left by %s (no longer running).", self.path, stale)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(dict(
        host=socket.gethostname(), pid=os.getpid(),
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))).encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # An empty file: nobody to name as a stale holder.
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
