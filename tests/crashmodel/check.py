"""Start the daemon on a crash state and check the promise.

Every acknowledged entry is stored exactly once: known by its entryId, or when a tool gave it
none (flowagg assigns one of its own), by a mark in its metadata. No entryId appears under
two batch ids and no batch id under two contents, counting the batches visible in the crash
state (a batch a reader saw, or a sink took, stays what it was) and those stored after the
restart; and the start is never blocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flowagg.batches.storage import CorruptBatch, decode_batch, iter_batch_files, read_batch
from flowagg.core.layout import Layout
from tests.crashmodel.model import DIR, State, materialize
from tests.harness import DaemonProc, entry, request, wait_for

START_DEADLINE_S = 20.0
SINK_LOG = "sink.log"
ANONYMOUS_MARK = "sessionId"  # in the metadata of an entry sent without an entryId
SINK_FAILS = "sink-fails"  # beside the sink script: it refuses every batch
SINK_HOLDS = "sink-holds"  # beside the sink script: it waits before taking a batch
RESEND_CHUNK = 50
VISIBLE_DIRS = ("aggregated/", "recovery/")


@dataclasses.dataclass
class Verdict:
    lost: list[str] = dataclasses.field(default_factory=list)
    duplicated: list[str] = dataclasses.field(default_factory=list)
    two_ids: list[str] = dataclasses.field(default_factory=list)  # entryId: batch ids
    two_contents: list[str] = dataclasses.field(default_factory=list)  # batch ids
    blocked: str = ""

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.two_ids or self.two_contents or self.blocked
        )

    def summary(self) -> str:
        parts = [
            f"{name} {value[:3]}" if isinstance(value, list) else f"{name}: {value}"
            for name, value in dataclasses.asdict(self).items()
            if value
        ]
        return "; ".join(parts) or "ok"


def _docs(raws: Iterable[bytes]) -> list[dict[str, Any]]:
    docs = []
    for raw in raws:
        try:
            docs.append(decode_batch(raw))
        except CorruptBatch:
            continue  # never whole, never visible as a batch
    return docs


def visible_batches(state: State, external: dict[str, bytes]) -> list[dict[str, Any]]:
    """The batches a reader could see in the crash state, and what the sink had taken."""
    raws = [
        content
        for rel, content in state.items()
        if content is not DIR and rel.startswith(VISIBLE_DIRS) and rel.endswith(".json")
    ]
    raws += [line for line in external.get(SINK_LOG, b"").splitlines() if line.strip()]
    return _docs(raws)


def sink_script(where: Path) -> Path:
    """A command sink that appends each batch, one line, to the file named by its argument;
    it refuses every batch while SINK_FAILS lies beside it and waits while SINK_HOLDS does."""
    script = where / "sink.sh"
    script.write_text(
        '#!/bin/sh\nhere="$(dirname "$0")"\n'
        f'while [ -e "$here/{SINK_HOLDS}" ]; do sleep 0.01; done\n'
        f'[ -e "$here/{SINK_FAILS}" ] && exit 1\n'
        '{ cat; echo; } >> "$1"\n'
    )
    script.chmod(0o755)
    return script


@contextlib.contextmanager
def short_run_dir() -> Iterator[Path]:
    """A run directory (socket, pid) of its own: a Unix socket's path must stay under 108
    bytes, which one under a test's deep work directory may not."""
    path = Path(tempfile.mkdtemp(prefix="flowagg-run-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_and_stop(
    work: Path, root: Path, settings: dict[str, Any], resend: Sequence[str] = ()
) -> str:
    """Start a daemon on `root`, let it take in its inbox, flush and stop it: "" when it did,
    else why the start was blocked. `resend`: entryIds a client sends again once the daemon
    is up, as one that never saw its answers would (other content: the id is what counts)."""
    daemon = DaemonProc(root, settings, log_path=work / "daemon.log")
    try:
        daemon.wait_ready(START_DEADLINE_S)
        layout = Layout(root, Path(settings["runDir"]))
        wait_for(lambda: not any(layout.inbox.glob("*.json*")), timeout=START_DEADLINE_S)
        for at in range(0, len(resend), RESEND_CHUNK):
            chunk = resend[at : at + RESEND_CHUNK]
            entries = [entry(10_000 + at + k, entryId=i) for k, i in enumerate(chunk)]
            reply = request(layout.socket, {"op": "add", "entries": entries})
            assert reply.get("ok") and not reply.get("rejected"), f"resend: {reply}"
        assert request(layout.socket, {"op": "flush"}).get("ok")
        code = daemon.stop(signal.SIGTERM, timeout=START_DEADLINE_S)
        assert code == 0, f"exit {code}"
    except (AssertionError, RuntimeError, TimeoutError, OSError) as exc:
        daemon.kill()
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return ""


def check_state(
    work: Path,
    state: State,
    external: dict[str, bytes],
    acked: set[str],
    settings: dict[str, Any],
    resend: Sequence[str] = (),
) -> Verdict:
    root = work / "data"
    materialize(state, root)
    sink_log = work / SINK_LOG
    sink_log.write_bytes(external.get(SINK_LOG, b""))
    settings = dict(settings)
    if settings.get("sinkType") == "command":
        settings["sinkCommand"] = f"{sink_script(work)} {sink_log}"
    verdict = Verdict()
    with short_run_dir() as run_dir:
        verdict.blocked = start_and_stop(work, root, {**settings, "runDir": str(run_dir)}, resend)
    if verdict.blocked:
        return verdict
    stored = []
    for path in iter_batch_files(Layout(root)):
        try:
            stored.append(read_batch(path))
        except CorruptBatch:
            verdict.blocked = f"unreadable batch file after the restart: {path.name}"
    counts = Counter(entry_key(e) for doc in stored for e in doc["entries"])
    verdict.lost = sorted(acked - set(counts))
    verdict.duplicated = sorted(i for i, c in counts.items() if c > 1)
    seen = visible_batches(state, external) + stored
    seen += _docs(line for line in sink_log.read_bytes().splitlines() if line.strip())
    ids_of: dict[str, set[str]] = {}
    contents: dict[str, set[str]] = {}
    for doc in seen:
        contents.setdefault(doc["batchId"], set()).add(doc["entriesSha256"])
        for e in doc["entries"]:
            ids_of.setdefault(e["entryId"], set()).add(doc["batchId"])
    verdict.two_ids = sorted(f"{i}: {sorted(b)}" for i, b in ids_of.items() if len(b) > 1)
    verdict.two_contents = sorted(b for b, c in contents.items() if len(c) > 1)
    return verdict


def entry_key(e: dict[str, Any]) -> str:
    """What an entry is known by: the mark of one sent without an entryId, else its entryId."""
    return str(e.get("metadata", {}).get(ANONYMOUS_MARK) or e["entryId"])


def acked_ids(replies: list[list[str]], count: int, upfront: Iterable[str]) -> set[str]:
    """The entryIds of the first `count` add requests answered, and those acknowledged up front."""
    acked = set(upfront)
    for ids in replies[:count]:
        acked.update(ids)
    return acked
