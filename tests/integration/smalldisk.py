"""A real small filesystem for the journal's full-disk tests.

As root: a tmpfs of the given size mounted on a fresh directory (a real
``ENOSPC``, grown later with ``remount``). Otherwise, a failing-filesystem
shim: the server's ``RLIMIT_FSIZE`` (set with ``prlimit`` on its pid) makes
every write past the size fail (``EFBIG``: SQLite reports an I/O error, so
the answer is 503 instead of 507), and raising it gives the space back.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
from pathlib import Path


class SmallDisk:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._pids: list[int] = []
        path.mkdir(parents=True, exist_ok=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        self.mounted = subprocess.run(mount, capture_output=True).returncode == 0
        # The status of a write refused for lack of space.
        self.full_status = 507 if self.mounted else 503

    def attach(self, pid: int) -> None:
        """A server writing to this disk (the shim limits its files' size)."""
        if not self.mounted:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (self.size, self.size))
            self._pids.append(pid)

    def grow(self, size: int = 256 << 20) -> None:
        """Space comes back."""
        if self.mounted:
            remount = ["mount", "-o", f"remount,size={size}", str(self.path)]
            subprocess.run(remount, check=True)
        else:
            for pid in self._pids:
                with contextlib.suppress(ProcessLookupError):
                    limit = resource.RLIM_INFINITY
                    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
        self.size = size

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False
