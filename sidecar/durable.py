"""One way to replace a file so that a crash leaves the old version or the new one, never a torn
one: write a temporary sibling, fsync it, rename it over the target, fsync the directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably (its directory is created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # a directory some filesystems cannot fsync: the rename is still atomic
        pass


def private_dir(path: str | Path) -> None:
    """Make sure only this user (root) can write ``path``: created 0750 when missing;
    PermissionError when it exists writable by every user or owned by another one, who could
    then plant the files the daemon trusts (the state it restores limits from, a model)."""
    path = Path(path)
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid not in (0, os.geteuid()):
        raise PermissionError(f"{path} is owned by uid {st.st_uid}: chown it to root")
    if st.st_mode & stat.S_IWOTH:
        raise PermissionError(f"{path} is writable by every user: chmod o-w it")
