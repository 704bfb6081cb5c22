"""Redaction before the journal (SPEC §11): unit rules, config, and a real daemon's root."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.core.config import load_config
from flowagg.core.entries import validate_entry_json
from flowagg.core.errors import ConfigError
from flowagg.core.redact import DEFAULT_KEYS, REDACTED, Redactor
from tests.harness import BASE_TS, cli, request, start_daemon, stored_entries, wait_for

SECRETS = ("hunter2-pw", "tok-5f1e9a", "cookie-9c2d", "alice@example.org", "4111-1111-1111-1111")


def _entry(metadata: dict[str, Any], **extra: Any) -> dict[str, Any]:
    doc = {"userId": "alice", "action": "login", "timestamp": BASE_TS, "metadata": metadata}
    doc.update(extra)
    return doc


def _nested() -> dict[str, Any]:
    return {
        "taskId": "T-1",
        "Password": SECRETS[0],
        "auth": {"headers": [{"AUTHORIZATION": {"scheme": "Bearer", "v": SECRETS[1]}}]},
        "deep": {"a": {"b": {"c": {"d": {"cookie": SECRETS[2]}}}}},
        "note": f"mail {SECRETS[3]} card {SECRETS[4]} ok",
        "list": [f"to {SECRETS[3]}", 7, None],
    }


PATTERNS = (r"[\w.+-]+@[\w-]+\.[\w.]+", r"\b\d{4}-\d{4}-\d{4}-\d{4}\b")


def test_keys_at_any_depth_and_any_case_patterns_inside_strings() -> None:
    redactor = Redactor(DEFAULT_KEYS, PATTERNS)
    metadata = _nested()
    redactor.metadata(metadata)
    assert metadata["Password"] == REDACTED
    assert metadata["auth"]["headers"][0]["AUTHORIZATION"] == REDACTED  # a whole object
    assert metadata["deep"]["a"]["b"]["c"]["d"]["cookie"] == REDACTED
    assert metadata["note"] == f"mail {REDACTED} card {REDACTED} ok"
    assert metadata["list"] == [f"to {REDACTED}", 7, None]
    assert metadata["taskId"] == "T-1"
    assert (redactor.entries, redactor.values) == (1, 6)
    clean = {"taskId": "T-2", "duration": 5, "tags": ["a", {"b": "c"}]}
    redactor.metadata(clean)
    assert clean == {"taskId": "T-2", "duration": 5, "tags": ["a", {"b": "c"}]}
    assert (redactor.entries, redactor.values) == (1, 6)


def test_leading_inline_flags_work_beside_other_patterns() -> None:
    redactor = Redactor((), (r"\d{4}", r"(?i)bearer\s+\w+", r"(?s)a.b"))
    metadata = {"h": "BEARER abc and 1234", "m": "a\nb"}
    redactor.metadata(metadata)
    assert metadata == {"h": f"{REDACTED} and {REDACTED}", "m": REDACTED}


def test_patterns_are_off_by_default_and_keys_can_be_emptied() -> None:
    metadata = {"note": SECRETS[3], "token": "x"}
    Redactor().metadata(metadata)
    assert metadata == {"note": SECRETS[3], "token": REDACTED}
    assert not Redactor((), ()).active


def test_only_metadata_is_touched_and_the_stored_json_is_redacted() -> None:
    redactor = Redactor(("userId", "action", "password"), PATTERNS)
    raw = _entry({"password": SECRETS[0]}, userId="bob@example.org", entryId="e@example.org")
    entry, _, data = validate_entry_json(
        raw, 0, now_ms=BASE_TS, max_entry_bytes=65536, new_id=str, redact=redactor.metadata
    )
    assert entry["userId"] == "bob@example.org" and entry["entryId"] == "e@example.org"
    assert entry["action"] == "login" and entry["timestamp"] == BASE_TS
    assert orjson.loads(data)["metadata"] == {"password": REDACTED}


def test_config_lists_from_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "flowagg.toml"
    path.write_text('redactKeys = ["pin"]\nredactPatterns = ["a{2,3}"]\n')
    config = load_config(config_path=path, environ={})
    assert config.values["redactKeys"] == ("pin",)
    assert config.values["redactPatterns"] == ("a{2,3}",)
    env = {"FLOWAGG_REDACT_KEYS": "pin, cvv", "FLOWAGG_REDACT_PATTERNS": '["x{1,2}y"]'}
    config = load_config(environ=env)
    assert config.values["redactKeys"] == ("pin", "cvv")
    assert config.values["redactPatterns"] == ("x{1,2}y",)
    assert load_config(environ={}).values["redactKeys"] == DEFAULT_KEYS


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"redactPatterns": '["(unclosed"]'}, "is not a regular expression"),
        ({"redactPatterns": '["x*"]'}, "matches the empty string"),
        ({"redactKeys": "[1]"}, "array of non-empty strings"),
    ],
)
def test_bad_redaction_settings_are_refused(flags: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match="redact") as info:
        load_config(flags=flags, environ={})
    assert needle in str(info.value)


def test_a_file_string_for_a_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flowagg.toml"
    path.write_text('redactKeys = "pin"\n')
    with pytest.raises(ConfigError, match="must be an array of strings"):
        load_config(config_path=path, environ={})


def _grep_root(root: Path, needles: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


def test_secrets_never_reach_any_file_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    settings = {"redactPatterns": orjson.dumps(list(PATTERNS)).decode(), "logLevel": "DEBUG"}
    daemon = start_daemon(root, settings)
    try:
        entries = [_entry(_nested(), entryId=f"e{i}") for i in range(20)]
        reply = request(daemon.layout.socket, {"op": "add", "entries": entries[:10]})
        assert reply["accepted"] == 10, reply
        proc = cli(root, "add", input=orjson.dumps(entries[10:]))
        assert proc.returncode == 0, proc.stderr
        spooled = root / "inbox" / "drop.json"
        spooled.with_suffix(".tmp").write_bytes(orjson.dumps(_entry(_nested(), entryId="s1")))
        os.rename(spooled.with_suffix(".tmp"), spooled)

        def counters() -> dict[str, Any]:
            return request(daemon.layout.socket, {"op": "status"})["counters"]

        # Counted once the spool file's entries are validated, before they are journaled.
        wait_for(lambda: counters()["redactedEntries"] == 21)
        wait_for(lambda: counters()["accepted"] == 21)
        assert counters()["redactedValues"] == 21 * 6
        assert cli(root, "flush").returncode == 0
    finally:
        assert daemon.stop() == 0
    health = orjson.loads((root / "health" / "latest.json").read_bytes())
    assert health["security"]["redactedEntries"] == 21
    stored = stored_entries(root)
    assert len(stored) == 21
    assert all(e["metadata"]["Password"] == REDACTED for e in stored)
    assert _grep_root(root, SECRETS) == []
    assert _grep_root(root, (REDACTED,)), "the check itself must see the batch files"


def test_remembered_verdicts_are_bounded_and_right_for_every_case() -> None:
    from flowagg.core import redact

    redactor = Redactor(("token",), (r"\d{3}",))
    for i in range(redact.KEY_CACHE_SIZE + 500):
        metadata = {f"k{i}": f"v{i}", "TOKEN": "x", "n": "abc"}
        redactor.metadata(metadata)
        assert metadata["TOKEN"] == REDACTED and metadata["n"] == "abc"
        assert metadata[f"k{i}"] == re.sub(r"\d{3}", REDACTED, f"v{i}")
    assert len(redactor._verdicts) <= redact.KEY_CACHE_SIZE
    assert len(redactor._subbed) <= redact.KEY_CACHE_SIZE


def test_flowagg_add_spool_writes_no_secret_either(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    metadata = {"password": SECRETS[0], "pin": "8421", "taskId": "T-1"}
    proc = cli(root, "add", "--spool", input=orjson.dumps(_entry(metadata)))
    assert proc.returncode == 0, proc.stderr
    (first,) = (root / "inbox").iterdir()
    assert orjson.loads(first.read_bytes())["metadata"] == {**metadata, "password": REDACTED}
    first.unlink()
    (root / "flowagg.toml").write_text('redactKeys = ["pin"]\n')
    proc = cli(root, "add", "--spool", input=orjson.dumps(_entry(metadata)))
    assert proc.returncode == 0, proc.stderr
    (second,) = (root / "inbox").iterdir()
    assert orjson.loads(second.read_bytes())["metadata"] == {**metadata, "pin": REDACTED}
