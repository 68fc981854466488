"""The sharded, resumable job runner of every analysis: work items evaluated once across a job's ranks, each
finished result appended to a partial-results file (keyed by a :func:`fingerprint` of everything the results
depend on, so a changed model or setting never resumes stale results) and picked up again by a re-run."""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critnet.distributed import Distributed
from critnet.errors import CritnetError

#: Bumped when the records change shape, so files written by another version are never read back.
RECORD_VERSION = 3


class ResumeError(CritnetError):
    """A partial-results directory that cannot be created or a file in it that cannot be read back."""


def fingerprint(kind: str, **identity: Any) -> str:
    """A short stable identifier (never ``hash()``) of the record version, the kind of analysis and everything
    its results depend on (JSON values).

    >>> fingerprint("example", model="ab12", settings={"seed": 0})
    '95f7bbba5e9615763b42f367'
    """
    payload = {"records": RECORD_VERSION, "kind": kind, **identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def assign(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Positions of ``costs`` per rank, sorted: longest job first onto the least-loaded rank (deterministic ties).

    >>> assign([3.0, 1.0, 1.0, 2.0], 2)
    [[0, 2], [1, 3]]
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        load, r = heapq.heappop(loads)
        shares[r].append(position)
        heapq.heappush(loads, (load + costs[position], r))
    return [sorted(s) for s in shares]


class RecordStore:
    """Append-only JSON-lines files ``<fingerprint>.rank<r>.jsonl`` under ``directory``: every rank appends to
    its own and all are read back, so a re-run with another number of processes still resumes."""

    def __init__(self, directory: str | Path, key: str, rank: int) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ResumeError(f"resume_dir: cannot create {str(self.directory)!r} ({err})") from None
        self.key = key
        self.path = self.directory / f"{key}.rank{rank}.jsonl"
        self._handle = None

    def load(self) -> dict[tuple[str, Hashable], Any]:
        """The value of every complete record of this fingerprint, by (phase, key); a torn last line is ignored."""
        records: dict[tuple[str, Hashable], Any] = {}
        for path in sorted(self.directory.glob(f"{self.key}.rank*.jsonl")):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.endswith("\n"):
                        break  # the writer was killed mid-line
                    try:
                        record = json.loads(line)
                        records[(record["phase"], record["key"])] = record["value"]
                    except (ValueError, KeyError, TypeError) as err:
                        raise ResumeError(f"resume_dir: {path}, line {number}, is damaged ({err!r}); remove the file "
                                          "to start afresh") from None
        return records

    def append(self, phase: str, key: Hashable, value: Any) -> None:
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        # json writes NaN/Infinity for non-finite sums and reads them back, so broken results resume too.
        self._handle.write(json.dumps({"phase": phase, "key": key, "value": value}, allow_nan=True) + "\n")
        self._handle.flush()  # a killed process loses at most the item it was working on

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass(frozen=True)
class Codec:
    """How one kind of result becomes a JSON value (for the record file and the gathers) and back; ``decode``
    also gets the work item the result belongs to."""

    encode: Callable[[Any], Any]
    decode: Callable[[Any, Any], Any]


#: Results that are JSON values already.
PLAIN = Codec(lambda value: value, lambda value, item: value)

#: ``record(key, result)``: how an evaluation hands over each result as soon as it is complete.
Record = Callable[[Hashable, Any], None]


class Jobs:
    """Work items evaluated once across the ranks of a job, resumable from ``resume_dir``.

    ``sharded`` items (the default) are shared among the ranks, longest first by their cost; each rank records
    its own and one gather hands every rank all results. ``replicated`` items are evaluated by every rank together
    (a collective, e.g. over images shared among the ranks), and the lead rank alone records them. Either way the
    lead rank's reading of the records decides for all ranks what is done, so every rank skips the same items and
    reaches the same collectives; every rank raises together when the records cannot be read.

    ``progress(done, total)`` gets this rank's counts as its items finish. Use as a context manager.

    >>> with Jobs() as jobs:
    ...     jobs.run("square", [(k, k) for k in range(3)], lambda work, record: [record(k, n * n) for k, n in work])
    {0: 0, 1: 1, 2: 4}
    """

    def __init__(self, distributed: Distributed | None = None, resume_dir: str | Path | None = None,
                 key: str | None = None, *, replicated: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.distributed = distributed or Distributed.single()
        self.replicated = replicated
        self.progress = progress
        self.done = 0
        self.total = 0
        #: Results taken from the records rather than evaluated, over all runs.
        self.resumed = 0
        self._store: RecordStore | None = None
        self._records: dict[tuple[str, Hashable], Any] = {}
        self._results: dict[tuple[str, Hashable], Any] = {}
        if resume_dir is not None:
            if key is None:
                raise ValueError("Jobs: a resume_dir needs the key (fingerprint) of its records")
            self._open(resume_dir, key)

    def _open(self, directory: str | Path, key: str) -> None:
        problem, records = None, {}
        try:
            if self.distributed.is_lead or not self.replicated:
                self._store = RecordStore(directory, key, self.distributed.rank)
            if self.distributed.is_lead:
                records = self._store.load()
        except ResumeError as err:  # an uncreatable directory or a damaged line, named in the message
            problem = str(err)
        # every rank reads (through the lead) before any rank writes: the gather is a barrier
        views = self.distributed.gather((problem, records))
        problems = [p for p, _ in views if p is not None]
        if problems:
            self.close()
            raise ResumeError(problems[0])
        self._records = views[0][1]

    def run(self, phase: str, work: Sequence[tuple[Hashable, Any]],
            evaluate: Callable[[list[tuple[Hashable, Any]], Record], None], codec: Codec = PLAIN,
            costs: Callable[[list[Any]], list[float]] | None = None) -> dict[Hashable, Any]:
        """The result of every ``(key, item)`` of ``work``, on every rank: those recorded or finished earlier as
        they are, the rest by ``evaluate(mine, record)``, which calls ``record(key, result)`` as each item of
        ``mine`` finishes. ``costs(items)`` weighs sharded items (default: all alike)."""
        results: dict[Hashable, Any] = {}
        todo = []
        for key, item in work:
            if (phase, key) in self._results:
                results[key] = self._results[(phase, key)]
            elif (phase, key) in self._records:
                results[key] = self._decode(codec, phase, key, item)
                self.resumed += 1
            else:
                todo.append((key, item))
        mine = todo if self.replicated else self._share(todo, costs)
        self.total += len(mine)
        self._report()
        local: dict[Hashable, Any] = {}

        def record(key: Hashable, result: Any) -> None:
            local[key] = result
            if self._store is not None:
                self._store.append(phase, key, codec.encode(result))
            self.done += 1
            self._report()

        evaluate(mine, record)
        missing = [key for key, _ in mine if key not in local]
        if missing:
            raise RuntimeError(f"{phase}: {len(missing)} items were not evaluated (first: {missing[0]!r})")
        if not self.replicated and self.distributed.world_size > 1:
            # plain JSON values travel, so any object gather works
            items = dict(todo)
            parts = self.distributed.gather([(key, codec.encode(result)) for key, result in local.items()])
            local = {key: codec.decode(value, items[key]) for part in parts for key, value in part}
        results.update(local)
        self._results.update(((phase, key), result) for key, result in local.items())
        return results

    def count(self, finished: int) -> None:
        """Report ``finished`` more items done outside :meth:`run` (progress only)."""
        self.total += finished
        self.done += finished
        self._report()

    def _share(self, todo: list[tuple[Hashable, Any]], costs: Callable[[list[Any]], list[float]] | None) -> list:
        weights = costs([item for _, item in todo]) if costs is not None else [1.0] * len(todo)
        return [todo[p] for p in assign(weights, self.distributed.world_size)[self.distributed.rank]]

    def _decode(self, codec: Codec, phase: str, key: Hashable, item: Any) -> Any:
        try:
            result = codec.decode(self._records[(phase, key)], item)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ResumeError(f"resume_dir: the record of {phase} {key!r} cannot be read back ({err!r}); remove the "
                              "partial-results files to start afresh") from None
        self._results[(phase, key)] = result
        return result

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
