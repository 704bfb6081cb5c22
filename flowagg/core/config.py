"""Configuration: defaults < TOML file < FLOWAGG_* environment < command-line flags (SPEC §9).

Every value remembers where it came from, so `flowagg config` can show it. Unknown keys and
out-of-range values are refused with the key named. What each setting is lives in
config_schema, how one value is checked in config_values, the rules across settings in
config_rules; here the sources are merged into a Config and its warnings are found.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shlex
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowagg.core.config_rules import check_metrics, check_sink
from flowagg.core.config_schema import SETTINGS, env_name
from flowagg.core.config_values import coerce
from flowagg.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: Path | None
    # `root` as the file says it, when a flag or the environment chose another.
    file_root: str | None = None

    def __getattr__(self, name: str) -> Any:
        key = _snake_to_camel(name)
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def root_path(self) -> Path:
        return Path(self.values["root"]).expanduser().absolute()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


@functools.cache
def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _unknown_key(path: Path, key: str) -> ConfigError:
    return ConfigError(f"config file {path}: unknown key {key!r}; {_suggest(key)}")


def _parse_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; create it or drop --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset"
            f" {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    return data


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, SETTINGS, n=1)
    return f"did you mean {close[0]!r}?" if close else "see `flowagg config` for the known keys"


def _is_file(path: Path) -> bool:
    """Path.is_file, except that a folder this user may not look into has no file either."""
    try:
        return path.is_file()
    except PermissionError:
        return False


def load_client_paths(
    *,
    root: str | None,
    config_path: str | Path | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, Path | None]:
    """The data root and run dir for client commands (add, status, flush, health, ...).

    Clients need only these two paths, so a mistake elsewhere in the daemon's config (an
    unknown key, a bad value, a stray byte) never stops them from handing over entries: the
    file is read leniently here, and only `root` and `runDir` are taken from it.
    """
    env = os.environ if environ is None else environ
    chosen_root = root or env.get("FLOWAGG_ROOT")
    run_dir = env.get(env_name("runDir")) or None
    file_path = config_path or env.get("FLOWAGG_CONFIG")
    if not file_path:
        candidate = Path(chosen_root or SETTINGS["root"].default) / "flowagg.toml"
        file_path = candidate if _is_file(candidate) else None
    if file_path and (chosen_root is None or run_dir is None):
        try:
            data = tomllib.loads(Path(file_path).read_bytes().decode("utf-8", "replace"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        if chosen_root is None and isinstance(data.get("root"), str) and data["root"]:
            chosen_root = data["root"]
        if run_dir is None and isinstance(data.get("runDir"), str) and data["runDir"]:
            run_dir = data["runDir"]
    root_path = Path(chosen_root or SETTINGS["root"].default).expanduser().absolute()
    return root_path, Path(run_dir).expanduser().absolute() if run_dir else None


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config. `flags` holds only the options given on the command line."""
    config, errors = check_config(flags=flags, config_path=config_path, environ=environ)
    if errors:
        raise errors[0]
    assert config is not None
    return config


def check_config(
    *,
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config | None, list[ConfigError]]:
    """The config and every mistake in it, not only the first (`flowagg config --check`).

    A key that is refused keeps its default, so the checks across keys still run on the rest.
    The config is None only when the file cannot be parsed at all.
    """
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, Any] = {k: s.default for k, s in SETTINGS.items()}
    sources: dict[str, str] = dict.fromkeys(SETTINGS, "default")
    errors: list[ConfigError] = []

    def take(key: str, raw: Any, origin: str) -> None:
        try:
            values[key] = coerce(key, raw, origin)
            sources[key] = origin
        except ConfigError as exc:
            errors.append(exc)

    known_env = {env_name(k) for k in SETTINGS} | {"FLOWAGG_CONFIG"}
    for key in env:
        if key.startswith("FLOWAGG_") and key not in known_env:
            errors.append(
                ConfigError(
                    f"environment variable {key} is not a flowagg setting; unset it or fix the name"
                )
            )

    # The root decides where the default config file lives, so resolve it first.
    root_guess = flags.get("root") or env.get("FLOWAGG_ROOT")
    file_path: Path | None = None
    if config_path:
        file_path = Path(config_path)
    elif env.get("FLOWAGG_CONFIG"):
        file_path = Path(env["FLOWAGG_CONFIG"])
    else:
        candidate = Path(root_guess or SETTINGS["root"].default) / "flowagg.toml"
        if _is_file(candidate):
            file_path = candidate

    file_root: str | None = None
    if file_path is not None:
        try:
            data = _parse_toml(file_path)
        except ConfigError as exc:
            return None, [*errors, exc]
        for key, raw in data.items():
            if key in SETTINGS:
                take(key, raw, f"file {file_path}")
            else:
                errors.append(_unknown_key(file_path, key))
        file_root = values["root"] if sources["root"] != "default" else None
    for key in SETTINGS:
        name = env_name(key)
        if name in env:
            take(key, env[name], f"env {name}")
    for key, raw in flags.items():
        if key in SETTINGS:
            take(key, raw, "flag")
        else:
            errors.append(ConfigError(f"unknown setting {key!r}; {_suggest(key)}"))
    values["logLevel"] = values["logLevel"].upper()
    for check in (check_sink, check_metrics):
        try:
            check(values, sources)
        except ConfigError as exc:
            errors.append(exc)
    config = Config(values=values, sources=sources, config_file=file_path, file_root=file_root)
    return config, errors


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but will not do what they seem to (said at start and by
    `flowagg config`): nothing here stops the daemon."""
    warnings = []
    if config.values["sinkType"] == "command":
        program = shlex.split(config.values["sinkCommand"])[0]
        if os.sep in program and shutil.which(program) is None:
            # A path is run as it is: PATH plays no part in it.
            what = "is not an executable file" if os.path.exists(program) else "does not exist"
            warnings.append(
                f"sinkCommand ({config.sources['sinkCommand']}): {program} {what}; every batch"
                " will fail until it does: install the program there or fix the path (under"
                " systemd, ProtectHome and PrivateTmp hide /home and /tmp)"
            )
        elif shutil.which(program) is None:
            warnings.append(
                f"sinkCommand ({config.sources['sinkCommand']}): program {program!r} is not found"
                f" on PATH ({os.environ.get('PATH', '')}); every batch will fail until it is:"
                " use an absolute path (under systemd, ProtectHome and PrivateTmp hide /home"
                " and /tmp)"
            )
    if config.file_root is not None:
        in_file = Path(config.file_root).expanduser().absolute()
        if in_file != config.root_path:
            warnings.append(
                f"root: the config file {config.config_file} says {in_file}, but"
                f" {config.root_path} is in use ({config.sources['root']}); make them agree"
            )
    return warnings
