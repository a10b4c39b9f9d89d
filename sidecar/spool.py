"""A bounded on-disk spool of trajectory records (msgpack), kept until a shipper takes them.

Layout: ``<dir>/seg-<20-digit sequence>.msgpack`` files, each a stream of msgpack maps, plus
``<dir>/spool.json`` (the dropped-record counter, written atomically). Appends go to the newest
segment; a new segment starts at ``segment_bytes`` and on every start-up (so a segment torn by a
crash is never appended to). When the total would exceed ``max_bytes``, the oldest segments are
deleted and their records not yet shipped (those past the shipper's acknowledged position,
``shipped``) counted as dropped: the newest experience is the most useful, and the host's disk is
never filled. A torn record at a segment's end is skipped when reading (and counted once, however
often it is read, as ``corrupt``: ``/debug/shipper``, ``faasrm_spool_corrupt_records_total``).
Records are flushed per append (not fsynced: losing the last records of a crash costs training
data, never correctness).

Records are the maps of ``sidecar.core.record.Record.pack``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from sidecar.core.record import REQUIRED
from sidecar.durable import write_atomic

_PREFIX, _SUFFIX = "seg-", ".msgpack"


def _seq_of(path: Path) -> int:
    """A segment file's sequence number."""
    return int(path.name[len(_PREFIX) : -len(_SUFFIX)])


def encode(record: dict) -> bytes:
    """A packed record (``Record.pack``) as msgpack bytes; refuses a map lacking a field readers
    need."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"trajectory record lacks {', '.join(missing)}")
    return msgpack.packb(record, use_bin_type=True)


@dataclass
class SpoolStats:
    records: int
    bytes: int
    segments: int
    dropped: int
    corrupt: int


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int, segment_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._meta = self.dir / "spool.json"
        self.shipped: tuple[int, int] = (0, 0)
        """The shipper's acknowledged position (segment, byte offset; kept by the shipper): the
        records before it are stored by the trainer, so dropping them loses nothing."""
        self.dropped = self._load_dropped()
        self.corrupt = 0
        self._corrupt_at: set[tuple[int, int]] = set()
        """The (segment, byte offset) of every corrupt spot counted: a segment is read again and
        again (shipping, a full spool), its torn tail counts once."""
        # sequence -> [bytes, records] of every segment on disk
        self._segs: dict[int, list[int]] = {}
        for path in sorted(self.dir.glob(f"{_PREFIX}*{_SUFFIX}")):
            seq = _seq_of(path)
            n = sum(1 for _ in self._read(path))
            self._segs[seq] = [path.stat().st_size, n]
        self._fh = None
        self._seq = max(self._segs, default=0)
        self._open_new()

    # -------------------------------------------------------------------------------- meta
    def _load_dropped(self) -> int:
        try:
            return int(json.loads(self._meta.read_text())["dropped"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _save_dropped(self) -> None:
        write_atomic(self._meta, json.dumps({"dropped": self.dropped}).encode())

    # -------------------------------------------------------------------------------- segments
    def _path(self, seq: int) -> Path:
        return self.dir / f"{_PREFIX}{seq:020d}{_SUFFIX}"

    def _open_new(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._seq += 1
        self._fh = open(self._path(self._seq), "ab")  # noqa: SIM115 (kept open for appends)
        self._segs[self._seq] = [0, 0]

    def _read(self, path: Path, end: int | None = None) -> Iterator[dict]:
        """The records of ``path`` (of its first ``end`` bytes, if given)."""
        try:
            data = path.read_bytes()[:end]
        except FileNotFoundError:
            return
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        try:
            for obj in unpacker:
                if isinstance(obj, dict):
                    yield obj
                else:
                    self._count_corrupt(path, unpacker.tell())
        except (msgpack.UnpackException, ValueError):
            self._count_corrupt(path, unpacker.tell())  # garbage: everything before it is good
            return
        if unpacker.tell() < len(data):  # torn tail after a crash: everything before it is good
            self._count_corrupt(path, unpacker.tell())

    def _count_corrupt(self, path: Path, offset: int) -> None:
        """Count the corrupt spot at ``offset`` of segment ``path`` unless counted already."""
        spot = (_seq_of(path), offset)
        if spot not in self._corrupt_at:
            self._corrupt_at.add(spot)
            self.corrupt += 1

    def total_bytes(self) -> int:
        return sum(b for b, _ in self._segs.values())

    def append(self, record: dict) -> None:
        data = encode(record)
        if self._segs[self._seq][0] + len(data) > self.segment_bytes and self._segs[self._seq][1]:
            self._open_new()
        self._make_room(len(data))
        assert self._fh is not None
        self._fh.write(data)
        self._fh.flush()
        seg = self._segs[self._seq]
        seg[0] += len(data)
        seg[1] += 1

    def _make_room(self, incoming: int) -> None:
        dropped = 0
        while self.total_bytes() + incoming > self.max_bytes and len(self._segs) > 1:
            oldest = min(self._segs)
            _, n = self._segs.pop(oldest)
            dropped += self._unshipped(oldest, n)
            self._path(oldest).unlink(missing_ok=True)
        if dropped:
            self.dropped += dropped
            self._save_dropped()

    def _unshipped(self, seq: int, n: int) -> int:
        """How many of segment ``seq``'s ``n`` records lie past the shipper's position."""
        segment, offset = self.shipped
        if seq < segment:
            return 0
        if seq > segment or not offset:
            return n
        return max(0, n - sum(1 for _ in self._read(self._path(seq), offset)))

    # -------------------------------------------------------------------------------- reading
    def segments(self) -> list[Path]:
        """Segment files oldest first (the current one last)."""
        return [self._path(s) for s in sorted(self._segs)]

    def iter_records(self) -> Iterator[dict]:
        for path in self.segments():
            yield from self._read(path)

    def remove(self, path: Path) -> None:
        """Delete a shipped segment (not the one being written)."""
        seq = _seq_of(path)
        if seq == self._seq:
            raise ValueError("cannot remove the segment being written")
        self._segs.pop(seq, None)
        path.unlink(missing_ok=True)

    def stats(self) -> SpoolStats:
        return SpoolStats(
            records=sum(n for _, n in self._segs.values()),
            bytes=self.total_bytes(),
            segments=len(self._segs),
            dropped=self.dropped,
            corrupt=self.corrupt,
        )

    def close(self) -> None:
        """Close the segment being written; an empty one is deleted unless it is the only one,
        whose number must survive so numbering never restarts below the shipper's position."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self._segs.get(self._seq) == [0, 0] and len(self._segs) > 1:
                self._segs.pop(self._seq)
                self._path(self._seq).unlink(missing_ok=True)
