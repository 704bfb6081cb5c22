"""An add's entries checked against the entry rules (SPEC §3): the valid ones and the rejections.

Apart from the pipeline because it reads none of the pipeline's state, only the settings,
the clock and the id source of the moment (`EntryRules`). The compiled path answers when it
accepts every entry; otherwise the validator goes over them and words each rejection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flowagg.core.clock import Clock
from flowagg.core.entries import EntryError, validate_entry_json
from flowagg.core.redact import Redactor
from flowagg.ingest.dedupe_gate import Valid
from flowagg.ingest.entry_codec import DecodedEntries, check_decoded


@dataclasses.dataclass(frozen=True)
class EntryRules:
    clock: Clock
    max_entry_bytes: int
    new_id: Callable[[], str]
    redactor: Redactor | None  # None when it has nothing to redact


def validate_entries(
    raw_entries: list[Any], rules: EntryRules, *, max_listed: int | None = None
) -> tuple[list[Valid], list[dict[str, Any]]]:
    """Check entries against §3: (valid entries, rejections).

    Past `max_listed` rejections are only counted: len(raw) - len(valid) is the total.
    """
    now = rules.clock.now_ms()
    limit = rules.max_entry_bytes
    new_id = rules.new_id
    redact = rules.redactor.metadata if rules.redactor is not None else None
    valid: list[Valid] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_entries):
        try:
            valid.append(
                validate_entry_json(
                    raw, index, now_ms=now, max_entry_bytes=limit, new_id=new_id, redact=redact
                )
            )
        except EntryError as exc:
            if max_listed is None or len(rejected) < max_listed:
                rejected.append({"index": index, "error": str(exc)})
    return valid, rejected


def check_compiled(entries: list[Any], rules: EntryRules) -> list[Valid] | None:
    """Every entry's `validate_entries` answer when all of `entries` (decoded by entry_codec)
    are valid, else None: the validator then goes over a plain parse and words why."""
    redactor = rules.redactor
    counted = (redactor.entries, redactor.values) if redactor is not None else (0, 0)
    valid = check_decoded(
        entries,
        now_ms=rules.clock.now_ms(),
        max_entry_bytes=rules.max_entry_bytes,
        new_id=rules.new_id,
        redact=redactor.metadata_many if redactor is not None else None,
    )
    if valid is None and redactor is not None:
        # The validator redacts its fresh parse again and counts that: this path's count of
        # the same values (made before the size rule) is undone.
        redactor.entries, redactor.values = counted
    return valid


def check_add(
    raw_entries: list[Any], rules: EntryRules, *, max_listed: int
) -> tuple[list[Valid], list[dict[str, Any]], int]:
    """An add request's entries: (valid entries, listed rejections, count of rejections)."""
    valid: list[Valid] | None = None
    rejected: list[dict[str, Any]] = []
    if isinstance(raw_entries, DecodedEntries):
        valid = check_compiled(raw_entries, rules)
        if valid is None:  # some entry breaks a rule: the validator words why
            raw_entries = raw_entries.plain()
    if valid is None:
        valid, rejected = validate_entries(raw_entries, rules, max_listed=max_listed)
    return valid, rejected, len(raw_entries) - len(valid)
