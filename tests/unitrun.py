"""A stand-in for `systemctl` where no systemd runs (tests/service/test_install_walk.py).

`unitrun.py verify|start|stop|restart UNIT` and `unitrun.py edit UNIT KEY=VALUE...` do for one
service unit under /etc/systemd/system what systemd would, as far as the unit's settings say:
RuntimeDirectory= and StateDirectory= made with User=/Group= and their modes, ExecStart= run as
User= (with its groups), UMask= and Environment=, stdout and stderr to a log beside the unit's
state (the journal's stand-in), started once READY=1 arrives on NOTIFY_SOCKET; a stop is
KillSignal= to the main process, then SIGKILL to what is left after TimeoutStopSec=, and the
RuntimeDirectory= removed. Run as root, in a private mount namespace: it writes /run and /etc.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIR = Path("/etc/systemd/system")
STATE = Path("/run/unitrun")
# What systemd puts on a service's PATH when the unit sets none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The tests wait no longer than this for READY=1 or for a stop, whatever the unit allows.
MAX_WAIT_S = 60.0

Settings = dict[str, list[str]]


def read_service(unit: str) -> Settings:
    """The [Service] settings of the unit file and its drop-ins, in systemd's order: an empty
    assignment clears the list that came before it."""
    path = UNIT_DIR / f"{unit}.service"
    settings: Settings = {}
    for file in [path, *sorted((UNIT_DIR / f"{unit}.service.d").glob("*.conf"))]:
        section = ""
        for raw in file.read_text().splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.endswith("\\"):
                sys.exit(f"{file}: continued lines are not understood here: {line}")
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "Service":
                key, _, value = line.partition("=")
                if value.strip():
                    settings.setdefault(key.strip(), []).append(value.strip())
                else:
                    settings[key.strip()] = []
    return settings


def last(settings: Settings, key: str, default: str = "") -> str:
    values = settings.get(key)
    return values[-1] if values else default


def seconds(value: str) -> float:
    """A systemd time span in the forms the unit uses: "30", "30s", "2min", "500ms"."""
    for suffix, scale in (("ms", 0.001), ("min", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


# The folders systemd makes for a system service: setting, where, and the variable naming them.
DIRECTORIES = (
    ("RuntimeDirectory", Path("/run"), "RUNTIME_DIRECTORY"),
    ("StateDirectory", Path("/var/lib"), "STATE_DIRECTORY"),
)


def managed_dirs(settings: Settings, key: str) -> list[Path]:
    return [
        base / n
        for k, base, _ in DIRECTORIES
        if k == key
        for v in settings.get(key, [])
        for n in v.split()
    ]


def service_env(settings: Settings, user: pwd.struct_passwd, notify: Path) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": user.pw_shell,
        "NOTIFY_SOCKET": str(notify),
    }
    for key, _, variable in DIRECTORIES:
        if paths := managed_dirs(settings, key):
            env[variable] = ":".join(str(p) for p in paths)
    if last(settings, "WatchdogSec"):
        env["WATCHDOG_USEC"] = str(int(seconds(last(settings, "WatchdogSec")) * 1_000_000))
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for the namespace's init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(unit: str) -> None:
    settings = read_service(unit)
    user = pwd.getpwnam(last(settings, "User", "root"))
    group = grp.getgrnam(last(settings, "Group", user.pw_name))
    for key, _, _ in DIRECTORIES:
        for path in managed_dirs(settings, key):
            path.mkdir(parents=True, exist_ok=True)
            # systemd hands the folder to the unit's user and sets the mode on every start.
            os.chown(path, user.pw_uid, group.gr_gid)
            os.chmod(path, int(last(settings, f"{key}Mode", "0755"), 8))
    argv = shlex.split(last(settings, "ExecStart"))
    if not argv or argv[0][0] in "-@:+!":
        sys.exit(f"{unit}: ExecStart={last(settings, 'ExecStart')!r} is not understood here")
    STATE.mkdir(mode=0o755, exist_ok=True)
    notify_path = STATE / f"{unit}.notify"
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        # Like /run/systemd/notify: any service user may send to it.
        os.chmod(notify_path, 0o777)
        notify.settimeout(0.2)
        with (STATE / f"{unit}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                env=service_env(settings, user, notify_path),
                user=user.pw_uid,
                group=group.gr_gid,
                extra_groups=os.getgrouplist(user.pw_name, group.gr_gid),
                umask=int(last(settings, "UMask", "0022"), 8),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (STATE / f"{unit}.pid").write_text(str(proc.pid))
        wait_ready(unit, proc, notify)
    print(f"{unit}.service: started, MAINPID={proc.pid}", flush=True)


def wait_ready(unit: str, proc: subprocess.Popen[bytes], notify: socket.socket) -> None:
    deadline = time.monotonic() + MAX_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{unit}.service: ExecStart exited with {proc.returncode}:\n{journal(unit)}")
        with contextlib.suppress(TimeoutError):
            if "READY=1" in notify.recv(4096).decode(errors="replace").splitlines():
                return
    sys.exit(f"{unit}.service: no READY=1 within {MAX_WAIT_S:.0f} s:\n{journal(unit)}")


def journal(unit: str) -> str:
    return (STATE / f"{unit}.log").read_text(errors="replace")[-4000:]


def stop(unit: str) -> None:
    settings = read_service(unit)
    pid_file = STATE / f"{unit}.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.Signals[last(settings, "KillSignal", "SIGTERM")])
        deadline = time.monotonic() + min(
            seconds(last(settings, "TimeoutStopSec", "90")), MAX_WAIT_S
        )
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()
    for path in managed_dirs(settings, "RuntimeDirectory"):
        shutil.rmtree(path, ignore_errors=True)
    print(f"{unit}.service: stopped", flush=True)


def edit(unit: str, assignments: list[str]) -> None:
    """What `systemctl edit` saves when the assignments are typed under [Service]."""
    folder = UNIT_DIR / f"{unit}.service.d"
    folder.mkdir(exist_ok=True)
    (folder / "override.conf").write_text("[Service]\n" + "".join(f"{a}\n" for a in assignments))


def verify(unit: str) -> None:
    """`systemd-analyze verify` on the installed unit, where systemd-analyze exists."""
    if shutil.which("systemd-analyze") is None:
        print("systemd-analyze not here: the unit file is not verified", flush=True)
        return
    path = UNIT_DIR / f"{unit}.service"
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, check=False
    )
    problems = [line for line in proc.stderr.splitlines() if path.name in line]
    if problems:
        sys.exit("\n".join(problems))
    print(f"{path}: verified", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("verify", "start", "stop", "restart", "edit"):
        sys.exit("usage: unitrun.py verify|start|stop|restart UNIT | edit UNIT KEY=VALUE...")
    command, unit = argv[0], argv[1].removesuffix(".service")
    if command == "edit":
        edit(unit, argv[2:])
        return
    if command in ("stop", "restart"):
        stop(unit)
    if command in ("start", "restart"):
        start(unit)
    if command == "verify":
        verify(unit)


if __name__ == "__main__":
    main(sys.argv[1:])
