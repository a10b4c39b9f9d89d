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
    """Make sure only this user (root) can write ``path`` or replace it: created 0750 when
    missing; PermissionError when it exists writable by every user or owned by another one, who
    could then plant the files the daemon trusts (the state it restores limits from, a model).
    So for every ancestor up to / (of its real path): one another user owns or every user can
    write could rename ``path`` away and put another in its place; a sticky one (/tmp) is safe,
    its entries (checked in turn) being root's or ours (as OpenSSH's StrictModes)."""
    path = Path(path)
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    real = path.resolve()
    for d in (real, *real.parents):
        st = d.stat()
        what = str(path) if d == real else f"{path}: its ancestor {d}"
        if st.st_uid not in (0, os.geteuid()):
            raise PermissionError(f"{what} is owned by uid {st.st_uid}: chown it to root")
        if st.st_mode & stat.S_IWOTH and (d == real or not st.st_mode & stat.S_ISVTX):
            raise PermissionError(f"{what} is writable by every user: chmod o-w it")
