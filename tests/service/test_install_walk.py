"""The README's "Running under systemd" walked as written, as root, without touching the host.

Both shell blocks of the section are read from README.md and run line by line in a private
mount and PID namespace, where every folder they write (/etc, /opt, /usr/local, /var, /run,
/root for pip's cache, /home and this checkout for the build) is a copy-on-write overlay whose
changes land in the test's tmp dir. When the namespace's first process ends, the kernel kills
what is left in it (the daemon among them) and the mounts go with it.

The walk runs with the caller's PATH, whatever python3 comes first on it: `sudo python3` is
what sudo's secure_path finds (Debian's /usr/bin/python3), as on the reader's machine; the
daemon starting as flowagg shows that its venv is one that account can run.

Only the substitutions in SUBSTITUTIONS are made, each with its reason; every other line runs
exactly as the README has it, so README and test cannot drift apart: a substitution that no
longer matches its line fails the test.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## Running under systemd"
UNITRUN = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'unitrun.py'))}"
# Every folder the walk writes; each gets a private overlay inside the namespace.
PRIVATE = ("/etc", "/opt", "/usr/local", "/var", "/run", "/root", "/home", str(REPO))
# What the walk makes. The host must hold after it exactly what it held before.
MADE = (
    "/opt/flowagg",
    "/usr/local/bin/flowagg",
    "/var/lib/flowagg",
    "/run/flowagg",
    "/etc/systemd/system/flowagg.service",
    "/etc/systemd/system/flowagg.service.d",
    "/root/.cache/pip",
    "/home/alice",
    str(REPO / "build"),
)
ACCOUNTS = (("passwd", "flowagg"), ("group", "flowagg"), ("passwd", "alice"))
TOOLS = ("unshare", "mount", "sudo", "su", "useradd", "usermod", "apt-get")
WALK_TIMEOUT_S = 600
# --kill-child: if the test is killed, so is the namespace's first process, and with it the rest.
NAMESPACE = ("unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child")
NAMESPACE += ("--mount-proc",)


@dataclass(frozen=True)
class Substitution:
    why: str
    line: str  # a regular expression for the whole README line
    # The shell for the matched line and the lines after it in its block; and how many of
    # those it stands for as well.
    shell: Callable[[re.Match[str], list[str]], tuple[str, int]]


def _command(line: str) -> str:
    """The line without its trailing comment (two spaces or more, then #)."""
    return re.sub(r"\s{2,}#.*$", "", line)


def _venv_if_needed(m: re.Match[str], _: list[str]) -> tuple[str, int]:
    install = _command(m[0])
    return (
        "if apt-get install --simulate python3-venv"
        " | grep -q '^0 upgraded, 0 newly installed, 0 to remove'"
        f"; then {install}; else sudo python3 -c 'import ensurepip, venv'; fi",
        0,
    )


def _edit(_: re.Match[str], after: list[str]) -> tuple[str, int]:
    typed = []
    for line in after:
        if not (m := re.fullmatch(r"#\s+(\w+=\S+)", line)):
            break
        typed.append(m[1])
    assert typed, "the README no longer says what to type into `systemctl edit`"
    return f"{UNITRUN} edit flowagg {shlex.join(typed)}", len(typed)


def _as_alice(_: re.Match[str], after: list[str]) -> tuple[str, int]:
    return f"su --login alice --command {shlex.quote(chr(10).join(after))}", len(after)


SUBSTITUTIONS = (
    Substitution(
        "the checkout is this repository",
        r"(.*)/path/to/this/checkout(.*)",
        lambda m, _: (m[1] + shlex.quote(str(REPO)) + m[2], 0),
    ),
    Substitution(
        "no network to Debian here: apt-get runs only when it is a no-op, else the test checks"
        " what the package is for",
        r"sudo apt-get install python3-venv\b.*",
        _venv_if_needed,
    ),
    Substitution(
        "no systemd runs here: unitrun verifies the installed unit with systemd-analyze and"
        " starts it as the unit says",
        r"sudo systemctl daemon-reload && sudo systemctl enable --now flowagg",
        lambda _, __: (f"{UNITRUN} verify flowagg && {UNITRUN} start flowagg", 0),
    ),
    Substitution(
        "`systemctl edit` opens an editor: unitrun saves the lines the README says to type",
        r"sudo systemctl edit flowagg\s+# add under \[Service\]:",
        _edit,
    ),
    Substitution(
        "no systemd runs here: unitrun stops and starts the unit",
        r"sudo systemctl restart flowagg",
        lambda _, __: (f"{UNITRUN} restart flowagg", 0),
    ),
    Substitution(
        "alice's shell is a login shell of hers (it has the group she was just given)",
        r"# in alice's shell profile.*",
        _as_alice,
    ),
)


def readme_blocks() -> list[list[str]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"^```sh\n(.*?)^```", text[start:end], re.S | re.M)
    assert len(blocks) >= 2, f"the README's {SECTION!r} lost its shell blocks"
    return [block.splitlines() for block in blocks[:2]]


def walk_steps(blocks: list[list[str]]) -> list[tuple[str, str]]:
    """(README line, the shell run for it), with every substitution used exactly once."""
    used = {s.why: 0 for s in SUBSTITUTIONS}
    steps = []
    for block in blocks:
        i = 0
        while i < len(block):
            line, i = block[i], i + 1
            shell, skip = line, 0
            for sub in SUBSTITUTIONS:
                if m := re.fullmatch(sub.line, line):
                    shell, skip = sub.shell(m, block[i:])
                    used[sub.why] += 1
            text = "\n".join(block[i - 1 : i + skip])
            i += skip
            if shell.strip() and not shell.lstrip().startswith("#"):
                steps.append((text, shell))
    wrong = {why: n for why, n in used.items() if n != 1}
    assert not wrong, f"substitutions that no longer match the README once: {wrong}"
    return steps


def check_line(blocks: list[list[str]]) -> str:
    [line] = [line for line in blocks[0] if line.endswith(" status")]
    return line


def walk_script(steps: list[tuple[str, str]], check: str, overlays: Path) -> str:
    lines = ["set -euo pipefail"]
    # Not the README: private overlays first, so nothing below reaches the host.
    for n, folder in enumerate(PRIVATE):
        upper, work = overlays / str(n) / "upper", overlays / str(n) / "work"
        lines += [
            f"mkdir -p {upper} {work}",
            f"mount -t overlay overlay -o lowerdir={folder},upperdir={upper},workdir={work}"
            f" {shlex.quote(folder)}",
        ]
    lines += [
        # The journal's stand-in, shown when a step fails.
        "trap 'echo \"### journal\"; cat /run/unitrun/flowagg.log 2>/dev/null || :' ERR",
        # Not the README: the user its second block lets in.
        "useradd --create-home alice",
        f"cd {shlex.quote(str(REPO))}",
    ]
    for text, shell in steps:
        lines += [f'printf "### %s %s\\n" "$EPOCHREALTIME" {shlex.quote(text)}', shell]
    lines += ['printf "### %s walked\\n" "$EPOCHREALTIME"', f"{check} --json"]
    return "\n".join(lines) + "\n"


def host_state() -> dict[str, object]:
    state: dict[str, object] = {path: os.path.lexists(path) for path in MADE}
    for database, name in ACCOUNTS:
        found = subprocess.run(["getent", database, name], capture_output=True, text=True)
        state[f"{database} {name}"] = found.stdout
    state["git status"] = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
    ).stdout
    return state


def require_tools() -> None:
    ci = os.environ.get("CI") == "true"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        if ci:
            pytest.fail(
                f"in CI the install walk needs {', '.join(missing)}: run it as root;"
                " .ci/run installs sudo, the rest comes with Debian"
            )
        pytest.skip(f"the install walk needs {', '.join(missing)}")


def markers(output: str) -> list[tuple[float, str, str]]:
    """(time, the step's first README line, what followed until the next marker) per step."""
    parts = re.split(r"^### (\d+\.\d+) ", output, flags=re.M)
    found = []
    for stamp, body in zip(parts[1::2], parts[2::2], strict=True):
        text, _, rest = body.partition("\n")
        found.append((float(stamp), text, rest))
    return found


def test_substitutions_each_match_one_line() -> None:
    steps = walk_steps(readme_blocks())
    assert any("pip install" in text for text, _ in steps)


@pytest.mark.slow
def test_install_walk_as_written(tmp_path: Path) -> None:
    require_tools()
    # An overlay's changes must land outside every folder made private.
    assert not any(tmp_path.is_relative_to(p) for p in PRIVATE), f"set TMPDIR outside {PRIVATE}"
    blocks = readme_blocks()
    check = check_line(blocks)
    script = tmp_path / "walk.sh"
    script.write_text(walk_script(walk_steps(blocks), check, tmp_path / "overlays"))
    before = host_state()
    proc = subprocess.run(
        [*NAMESPACE, "bash", str(script)],
        # The caller's PATH (pyenv's shims first, say): sudo's secure_path decides what runs.
        env={"PATH": os.environ["PATH"], "HOME": "/root", "LANG": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=WALK_TIMEOUT_S,
        check=False,
    )
    assert host_state() == before
    steps = markers(proc.stdout)
    assert proc.returncode == 0 and steps and steps[-1][1] == "walked", proc.stdout[-6000:]
    took = {a[1]: round(b[0] - a[0], 1) for a, b in itertools.pairwise(steps)}
    print("seconds per step:", json.dumps(took, indent=1))
    # The check line ran as written and reached the daemon the unit started.
    [(_, _, checked)] = [s for s in steps if s[1] == check]
    started = re.search(r"MAINPID=(\d+)", proc.stdout)
    assert started, proc.stdout
    assert re.search(rf"flowagg \S+ pid {started[1]} on /var/lib/flowagg, up ", checked), checked
    # alice's `flowagg add`, through the group's socket after the restart.
    status = json.loads(steps[-1][2])
    assert status["counters"]["accepted"] == 1, status
    passwd = (tmp_path / "overlays" / str(PRIVATE.index("/etc")) / "upper" / "passwd").read_text()
    assert re.search(r"^flowagg:", passwd, re.M), "useradd did not write the private /etc"
