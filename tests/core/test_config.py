"""Configuration: defaults < TOML file < FLOWAGG_* env < flags (SPEC §2, §9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowagg.core.config import Config, load_config
from flowagg.core.config_schema import SETTINGS, env_name
from flowagg.core.errors import EXIT_USAGE, ConfigError


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default root is ./data; never let a stray ./data/flowagg.toml leak into a test.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def load(
    *,
    flags: dict[str, Any] | None = None,
    config_path: Path | str | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    return load_config(flags=flags, config_path=config_path, environ=environ or {})


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(**kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kw)
    assert info.value.exit_code == EXIT_USAGE
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# defaults


def test_defaults_match_the_spec() -> None:
    config = load()
    assert config.config_file is None
    expected = {
        "root": "data",
        "batchSize": 50,
        "maxAgeMs": 30_000,
        "flushThreshold": 0.9,
        "maxBatchBytes": 65_536,
        "maxEntryBytes": 65_536,
        "maxRequestBytes": 16 * 1024 * 1024,
        "dedupeWindowMs": 86_400_000,
        "immediateRetries": 3,
        "retryBaseMs": 1000,
        "logLevel": "INFO",
    }
    for key, value in expected.items():
        assert config.values[key] == value, key
    # Spec defaults for settings that may not all exist yet; checked where they do.
    spec_defaults = {
        "retryMaxDelayMs": 300_000,
        "batchRetryLimit": 5,
        "scheduleIntervalMs": 300_000,
        "healthCheckIntervalMs": 60_000,
        "cleanupAgeMs": 7 * 86_400_000,
    }
    for key, value in spec_defaults.items():
        if key in SETTINGS:
            assert config.values[key] == value, key
    assert set(config.values) == set(SETTINGS)
    assert all(source == "default" for source in config.sources.values())


def test_every_default_is_within_its_own_range() -> None:
    for key, setting in SETTINGS.items():
        if setting.minimum is not None:
            assert setting.default >= setting.minimum, key
        if setting.maximum is not None:
            assert setting.default <= setting.maximum, key


def test_attribute_access_and_root_path(tmp_path: Path) -> None:
    config = load(flags={"root": str(tmp_path / "r")})
    assert config.batch_size == 50
    assert config.max_age_ms == 30_000
    assert config.flush_threshold == 0.9
    assert config.root_path == tmp_path / "r"
    assert load().root_path == Path.cwd() / "data"
    assert load().root_path.is_absolute()
    with pytest.raises(AttributeError):
        _ = config.no_such_setting


def test_as_dict_is_a_copy() -> None:
    config = load()
    d = config.as_dict()
    d["batchSize"] = 1
    assert config.values["batchSize"] == 50


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("root", "FLOWAGG_ROOT"),
        ("batchSize", "FLOWAGG_BATCH_SIZE"),
        ("maxAgeMs", "FLOWAGG_MAX_AGE_MS"),
        ("flushThreshold", "FLOWAGG_FLUSH_THRESHOLD"),
        ("journalSegmentBytes", "FLOWAGG_JOURNAL_SEGMENT_BYTES"),
    ],
)
def test_env_names(key: str, name: str) -> None:
    assert env_name(key) == name


# --------------------------------------------------------------------------------------------
# the TOML file


def test_toml_file_values_and_sources(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "c.toml",
        'batchSize = 7\nflushThreshold = 0.5\nlogLevel = "debug"\nroot = "/srv/x"\n',
    )
    config = load(config_path=path)
    assert config.config_file == path
    assert config.values["batchSize"] == 7
    assert config.values["flushThreshold"] == 0.5
    assert isinstance(config.values["flushThreshold"], float)
    assert config.values["logLevel"] == "DEBUG"
    assert config.values["root"] == "/srv/x"
    for key in ("batchSize", "flushThreshold", "logLevel", "root"):
        assert config.sources[key] == f"file {path}"
    assert config.sources["maxAgeMs"] == "default"


def test_toml_integer_accepted_for_a_float_setting(tmp_path: Path) -> None:
    config = load(config_path=write_toml(tmp_path / "c.toml", "flushThreshold = 1\n"))
    assert config.values["flushThreshold"] == 1.0
    assert isinstance(config.values["flushThreshold"], float)


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "env.toml", "batchSize = 9\n")
    config = load(environ={"FLOWAGG_CONFIG": str(path)})
    assert config.config_file == path
    assert config.values["batchSize"] == 9
    assert config.sources["batchSize"] == f"file {path}"


def test_config_path_argument_beats_env(tmp_path: Path) -> None:
    a = write_toml(tmp_path / "a.toml", "batchSize = 1\n")
    b = write_toml(tmp_path / "b.toml", "batchSize = 2\n")
    config = load(config_path=a, environ={"FLOWAGG_CONFIG": str(b)})
    assert config.values["batchSize"] == 1
    assert config.config_file == a


def test_root_file_picked_up_from_flag_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = write_toml(root / "flowagg.toml", "batchSize = 11\n")
    config = load(flags={"root": str(root)})
    assert config.config_file == path
    assert config.values["batchSize"] == 11
    assert config.sources["batchSize"] == f"file {path}"


def test_root_file_picked_up_from_env_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_toml(root / "flowagg.toml", "batchSize = 12\n")
    config = load(environ={"FLOWAGG_ROOT": str(root)})
    assert config.values["batchSize"] == 12
    assert config.sources["root"] == "env FLOWAGG_ROOT"


def test_root_file_picked_up_from_default_root() -> None:
    path = write_toml(Path.cwd() / "data" / "flowagg.toml", "batchSize = 13\n")
    config = load()
    assert config.values["batchSize"] == 13
    assert config.config_file is not None
    assert config.config_file.resolve() == path.resolve()


def test_flag_root_decides_which_root_file(tmp_path: Path) -> None:
    write_toml(tmp_path / "envroot" / "flowagg.toml", "batchSize = 1\n")
    write_toml(tmp_path / "flagroot" / "flowagg.toml", "batchSize = 2\n")
    config = load(
        flags={"root": str(tmp_path / "flagroot")},
        environ={"FLOWAGG_ROOT": str(tmp_path / "envroot")},
    )
    assert config.values["batchSize"] == 2


def test_explicit_config_beats_root_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_toml(root / "flowagg.toml", "batchSize = 1\n")
    explicit = write_toml(tmp_path / "explicit.toml", "maxAgeMs = 5000\n")
    config = load(flags={"root": str(root)}, config_path=explicit)
    assert config.config_file == explicit
    assert config.values["batchSize"] == 50  # the root file is not read at all
    assert config.values["maxAgeMs"] == 5000


def test_no_root_file_means_no_config_file(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    assert load(flags={"root": str(tmp_path / "root")}).config_file is None


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = config_error(config_path=missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", "batchSize = = 3\n")
    message = config_error(config_path=path)
    assert "not valid TOML" in message
    assert str(path) in message


def test_a_non_utf8_byte_in_the_toml_file_is_a_one_line_error(tmp_path: Path) -> None:
    # tomllib raised UnicodeDecodeError, which killed a reloading daemon and printed tracebacks.
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"batchSize = 7 # caf\xe9\n")
    message = config_error(config_path=path)
    assert "not UTF-8" in message and "0xe9" in message and str(path) in message


@pytest.mark.parametrize("url", ["http://[::1/", "http://", "ftp://host/x", "http://h:99999/"])
def test_a_broken_sink_url_is_refused_at_load(url: str) -> None:
    message = config_error(flags={"sinkType": "http", "sinkUrl": url})
    assert "sinkUrl" in message


# --------------------------------------------------------------------------------------------
# environment and flags


def test_env_values_and_sources() -> None:
    config = load(
        environ={
            "FLOWAGG_BATCH_SIZE": "1_000",
            "FLOWAGG_FLUSH_THRESHOLD": "0.25",
            "FLOWAGG_LOG_LEVEL": "warning",
            "HOME": "/ignored",
            "FLOWAGGX": "not ours",
        }
    )
    assert config.values["batchSize"] == 1000
    assert config.values["flushThreshold"] == 0.25
    assert config.values["logLevel"] == "WARNING"
    assert config.sources["batchSize"] == "env FLOWAGG_BATCH_SIZE"
    assert config.sources["flushThreshold"] == "env FLOWAGG_FLUSH_THRESHOLD"
    assert config.sources["maxAgeMs"] == "default"


def test_flags_values_and_sources() -> None:
    config = load(flags={"batchSize": "20", "maxAgeMs": 1500, "root": None})
    assert config.values["batchSize"] == 20
    assert config.values["maxAgeMs"] == 1500
    assert config.sources["batchSize"] == "flag"
    assert config.sources["root"] == "default"  # None means "not given"


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "c.toml",
        "batchSize = 1\nmaxAgeMs = 1000\nmaxBatchBytes = 2048\n",
    )
    environ = {"FLOWAGG_BATCH_SIZE": "2", "FLOWAGG_MAX_AGE_MS": "2000"}
    config = load(flags={"batchSize": 3}, config_path=path, environ=environ)
    assert config.values["batchSize"] == 3
    assert config.sources["batchSize"] == "flag"
    assert config.values["maxAgeMs"] == 2000
    assert config.sources["maxAgeMs"] == "env FLOWAGG_MAX_AGE_MS"
    assert config.values["maxBatchBytes"] == 2048
    assert config.sources["maxBatchBytes"] == f"file {path}"
    assert config.values["maxEntryBytes"] == 65_536
    assert config.sources["maxEntryBytes"] == "default"


def test_root_precedence(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", 'root = "from-file"\n')
    assert load(config_path=path).values["root"] == "from-file"
    env = {"FLOWAGG_ROOT": "from-env"}
    assert load(config_path=path, environ=env).values["root"] == "from-env"
    config = load(config_path=path, environ=env, flags={"root": "from-flag"})
    assert config.values["root"] == "from-flag"
    assert config.sources["root"] == "flag"


# --------------------------------------------------------------------------------------------
# errors name the key


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", "batchsize = 3\n")
    message = config_error(config_path=path)
    assert "unknown key 'batchsize'" in message
    assert "did you mean 'batchSize'?" in message


def test_unknown_table_in_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", "[sink]\nurl = 'http://x'\n")
    assert "unknown key 'sink'" in config_error(config_path=path)


def test_unknown_flowagg_env_var() -> None:
    message = config_error(environ={"FLOWAGG_BATCHSIZE": "3"})
    assert "FLOWAGG_BATCHSIZE" in message
    assert "not a flowagg setting" in message


def test_flowagg_config_env_is_not_unknown(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "c.toml", "")
    assert load(environ={"FLOWAGG_CONFIG": str(path)}).config_file == path


def test_unknown_flag() -> None:
    message = config_error(flags={"batchSise": 3})
    assert "'batchSise'" in message
    assert "did you mean 'batchSize'?" in message


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("batchSize", 0, "below the minimum 1"),
        ("batchSize", 1_000_001, "above the maximum"),
        ("flushThreshold", 0.001, "below the minimum 0.01"),
        ("flushThreshold", 1.5, "above the maximum 1"),
        ("maxBatchBytes", 1023, "below the minimum 1024"),
        ("maxEntryBytes", 63, "below the minimum 64"),
        ("immediateRetries", 11, "above the maximum 10"),
        ("dedupeWindowMs", -1, "below the minimum 0"),
    ],
)
def test_out_of_range_named_for_every_origin(
    tmp_path: Path, key: str, value: float, words: str
) -> None:
    path = write_toml(tmp_path / "c.toml", f"{key} = {value}\n")
    from_file = config_error(config_path=path)
    assert from_file.startswith(f"{key} (file {path}): ")
    assert words in from_file
    from_env = config_error(environ={env_name(key): str(value)})
    assert from_env.startswith(f"{key} (env {env_name(key)}): ")
    assert words in from_env
    from_flag = config_error(flags={key: value})
    assert from_flag.startswith(f"{key} (flag): ")
    assert words in from_flag


@pytest.mark.parametrize(
    ("key", "minimum", "maximum"),
    [("batchSize", 1, 1_000_000), ("flushThreshold", 0.01, 1.0), ("immediateRetries", 0, 10)],
)
def test_range_bounds_are_inclusive(key: str, minimum: float, maximum: float) -> None:
    assert load(flags={key: minimum}).values[key] == minimum
    assert load(flags={key: maximum}).values[key] == maximum


@pytest.mark.parametrize(
    ("toml_value", "words"),
    [
        ('"fifty"', "must be an integer"),
        ("5.5", "must be an integer"),
        ("true", "must be an integer"),
        ("[1]", "must be an integer"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, toml_value: str, words: str) -> None:
    path = write_toml(tmp_path / "c.toml", f"batchSize = {toml_value}\n")
    message = config_error(config_path=path)
    assert message.startswith("batchSize (file ")
    assert words in message


@pytest.mark.parametrize("toml_value", ['"high"', "true", "{a = 1}"])
def test_wrong_type_for_float_in_file(tmp_path: Path, toml_value: str) -> None:
    path = write_toml(tmp_path / "c.toml", f"flushThreshold = {toml_value}\n")
    assert "flushThreshold" in config_error(config_path=path)
    assert "must be a number" in config_error(config_path=path)


@pytest.mark.parametrize("toml_value", ["5", '""', '["a"]'])
def test_wrong_type_for_string_in_file(tmp_path: Path, toml_value: str) -> None:
    path = write_toml(tmp_path / "c.toml", f"root = {toml_value}\n")
    message = config_error(config_path=path)
    assert message.startswith("root (file ")
    assert "must be a non-empty string" in message


@pytest.mark.parametrize("raw", ["", "12abc", "1.5", "0x10", "ten"])
def test_wrong_type_in_env(raw: str) -> None:
    message = config_error(environ={"FLOWAGG_BATCH_SIZE": raw})
    assert message.startswith("batchSize (env FLOWAGG_BATCH_SIZE): must be an integer")


def test_wrong_type_flag() -> None:
    assert "must be an integer" in config_error(flags={"maxAgeMs": "soon"})
    assert "must be a number" in config_error(flags={"flushThreshold": "most"})


def test_bad_log_level_named() -> None:
    message = config_error(environ={"FLOWAGG_LOG_LEVEL": "verbose"})
    assert message.startswith("logLevel (env FLOWAGG_LOG_LEVEL): must be one of")


def test_error_in_file_is_reported_even_if_env_overrides(tmp_path: Path) -> None:
    # An invalid file is invalid; a later layer does not hide it.
    path = write_toml(tmp_path / "c.toml", "batchSize = 0\n")
    message = config_error(config_path=path, environ={"FLOWAGG_BATCH_SIZE": "5"})
    assert message.startswith("batchSize (file ")


@pytest.mark.parametrize("origin", ["file", "env", "flag"])
def test_nan_is_out_of_range(tmp_path: Path, origin: str) -> None:
    if origin == "file":
        path = write_toml(tmp_path / "c.toml", "flushThreshold = nan\n")
        config_error(config_path=path)
    elif origin == "env":
        config_error(environ={"FLOWAGG_FLUSH_THRESHOLD": "nan"})
    else:
        config_error(flags={"flushThreshold": "nan"})


@pytest.mark.parametrize("raw", ["inf", "-inf"])
def test_infinity_is_out_of_range(raw: str) -> None:
    assert "flushThreshold" in config_error(environ={"FLOWAGG_FLUSH_THRESHOLD": raw})


def test_load_config_does_not_touch_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # With an explicit environ, the process environment is ignored entirely.
    monkeypatch.setenv("FLOWAGG_BOGUS", "1")
    monkeypatch.setenv("FLOWAGG_BATCH_SIZE", "3")
    config = load_config(environ={})
    assert config.values["batchSize"] == 50


@pytest.mark.parametrize("value", ["0", "-1", "65", "many", "1e3", "", "9" * 400])
def test_flush_writers_out_of_range_or_not_a_number_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="flushWriters"):
        load(environ={"FLOWAGG_FLUSH_WRITERS": value})


def test_flush_writers_one_writes_one_at_a_time() -> None:
    assert load(environ={"FLOWAGG_FLUSH_WRITERS": "1"}).flush_writers == 1


NUMERIC = sorted(k for k, s in SETTINGS.items() if s.kind in (int, float))


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_setting_refuses_hostile_values_by_name(key: str) -> None:
    """Empty, not a number, huge, NaN, one past each end of its range and, for a number that
    is not an integer, a vanishing one: each refused with the key named, from the environment
    (always text) as from a flag."""
    setting = SETTINGS[key]
    hostile = ["", "abc", "1" * 400, "nan", "\x00", "1e999"]
    if setting.kind is float:
        hostile += ["1e-300", "5e-324"]
    if setting.minimum is not None:
        hostile.append(str(setting.kind(setting.minimum) - 1))
    if setting.maximum is not None:
        hostile.append(str(setting.kind(setting.maximum) + 1))
    for value in hostile:
        with pytest.raises(ConfigError, match=key):
            load(environ={env_name(key): value})
    with pytest.raises(ConfigError, match=key):
        load(flags={key: [1]})


def test_the_smallest_rate_loads_and_zero_stays_off() -> None:
    config = load(environ={"FLOWAGG_RATE_LIMIT_PER_USER": "0.001"})
    assert config.values["rateLimitPerUser"] == 0.001
    assert load(environ={"FLOWAGG_RATE_LIMIT_PER_UID": "0"}).values["rateLimitPerUid"] == 0.0
