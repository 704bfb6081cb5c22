"""The data root's layout (SPEC §2) and the checks that decide whether a root is usable."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from flowagg.core.errors import RootUnusableError
from flowagg.core.fsutil import fsync_dir

# Inside the journal folder: the spool files the daemon adopted, named by the add records.
SPOOL_FOLDER = "spool"

ROOT_MODE = 0o700
# With socketGroup the group may pass through the root to inbox/ (but not list it), drop files
# into inbox/ and reach the socket. inbox/ is a drop box like Postfix's maildrop: members create
# files there but cannot list it, and the sticky bit keeps them from renaming or deleting each
# other's. No setgid bit: systemd's RestrictSUIDSGID denies it, and `add --spool` gives its file
# the group itself.
SHARED_ROOT_MODE = 0o710
SHARED_INBOX_MODE = 0o1730
SHARED_RUN_MODE = 0o750


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path
    # Socket, pid and a lock of its own. Apart from the root because a Unix socket cannot be
    # bound on every file system (FUSE, NFS); systemd's RuntimeDirectory gives /run/flowagg.
    run_dir: Path | None = None
    # socketGroup's gid: shares the root (to traverse), inbox/ and the run dir with it.
    group: int | None = None

    @classmethod
    def for_config(cls, config: object) -> Layout:
        from flowagg.core.config_values import resolve_group

        values = config.values  # type: ignore[attr-defined]
        run = values["runDir"]
        return cls(
            config.root_path,  # type: ignore[attr-defined]
            Path(run).expanduser().absolute() if run else None,
            resolve_group(values["socketGroup"]) if values["socketGroup"] else None,
        )

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def journal_spool(self) -> Path:
        return self.journal / SPOOL_FOLDER

    @property
    def aggregated(self) -> Path:
        return self.root / "aggregated"

    @property
    def recovery(self) -> Path:
        return self.root / "recovery"

    @property
    def abandoned(self) -> Path:
        return self.root / "recovery" / "abandoned"

    @property
    def refused(self) -> Path:
        """Entries a sink refused one by one (sink_refused); made on first use."""
        return self.root / "recovery" / "refused"

    @property
    def errors(self) -> Path:
        return self.root / "recovery" / "errors"

    @property
    def health(self) -> Path:
        return self.root / "health"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.run_dir if self.run_dir is not None else self.root / "run"

    @property
    def root_lock_file(self) -> Path:
        """The one-daemon-per-root lock: in the root, so no runDir setting gets around it."""
        return self.root / "flowagg.lock"

    @property
    def root_pid_file(self) -> Path:
        return self.root / "flowagg.pid"

    @property
    def run_lock_file(self) -> Path:
        return self.run / "flowagg.lock"

    @property
    def pid_file(self) -> Path:
        return self.run / "flowagg.pid"

    @property
    def socket(self) -> Path:
        return self.run / "flowagg.sock"

    def all_dirs(self) -> list[Path]:
        return [
            self.inbox,
            self.journal,
            self.journal_spool,
            self.aggregated,
            self.recovery,
            self.abandoned,
            self.errors,
            self.health,
            self.logs,
            self.run,
        ]

    def private_dirs(self) -> list[Path]:
        """Directories whose temp files belong to flowagg (inbox temps belong to clients)."""
        return [
            self.journal,
            self.journal_spool,
            self.aggregated,
            self.recovery,
            self.abandoned,
            self.refused,
            self.errors,
            self.health,
            self.run,
        ]

    def access(self, directory: Path) -> tuple[int, int | None]:
        """(mode, group or None to leave it) a folder must have: shared ones go to the group."""
        if self.group is None:
            return ROOT_MODE, None
        shared = {
            self.root: SHARED_ROOT_MODE,
            self.inbox: SHARED_INBOX_MODE,
            self.run: SHARED_RUN_MODE,
        }
        if directory in shared:
            return shared[directory], self.group
        return ROOT_MODE, None

    def prepare(self) -> None:
        """Create the root (0700) and its folders, or raise RootUnusableError (exit 4)."""
        root = self.root
        parent = root.parent
        created: list[Path] = []
        if not root.exists():
            if not parent.is_dir():
                raise RootUnusableError(
                    f"data root {root}: parent folder {parent} does not exist; create it first"
                )
            try:
                os.mkdir(root, ROOT_MODE)
            except OSError as exc:
                raise RootUnusableError(
                    f"data root {root}: cannot create it ({exc.strerror}); check permissions"
                ) from None
            created.append(root)
        if not root.is_dir():
            raise RootUnusableError(
                f"data root {root} is not a directory; point --root at a folder"
            )
        st = root.stat()
        if st.st_uid != os.geteuid():
            raise RootUnusableError(
                f"data root {root} is owned by uid {st.st_uid}, not {os.geteuid()};"
                " run as its owner or choose another --root"
            )
        if st.st_mode & stat.S_IWOTH:
            mode = self.access(root)[0]
            raise RootUnusableError(
                f"data root {root} is world-writable (mode {stat.S_IMODE(st.st_mode):04o}), so"
                f" anyone could replace its files; run `chmod {mode:04o} {root}`"
            )
        if not os.access(root, os.W_OK | os.X_OK):
            raise RootUnusableError(f"data root {root} is not writable; fix its permissions")
        self._secure(root)
        for directory in self.all_dirs():
            try:
                directory.mkdir(mode=ROOT_MODE)
                created.append(directory)
            except FileExistsError:
                pass
            except OSError as exc:
                raise RootUnusableError(
                    f"data root {root}: cannot create {directory.name}/ ({exc.strerror});"
                    " check permissions and free space"
                ) from None
            if not directory.is_dir():
                raise RootUnusableError(
                    f"data root {root}: {directory} is not a directory; move it away"
                )
            self._secure(directory)
        # A new folder lives in its parent's entries: unsynced, a power cut could take it away
        # with the files fsync'd into it.
        for folder in dict.fromkeys(d.parent for d in created):
            try:
                fsync_dir(folder)
            except OSError as exc:
                raise RootUnusableError(
                    f"data root {root}: cannot fsync {folder} ({exc.strerror}); check permissions"
                ) from None

    def _secure(self, directory: Path) -> None:
        """Give a folder its mode (and group): a root shared once and then unshared, or a
        folder made under a loose umask, must not stay open to others."""
        from flowagg.core.config_values import group_name

        mode, gid = self.access(directory)
        st = directory.stat()
        try:
            if gid is not None and st.st_gid != gid:
                os.chown(directory, -1, gid)
            if stat.S_IMODE(st.st_mode) != mode or gid is not None:
                os.chmod(directory, mode)
        except OSError as exc:
            if gid is None:
                raise RootUnusableError(
                    f"cannot make {directory} private (chmod {mode:04o}: {exc.strerror});"
                    " run the daemon as the folder's owner"
                ) from None
            name = group_name(gid)
            raise RootUnusableError(
                f"cannot share {directory} with group {name} ({exc.strerror}): the daemon's user"
                f" must be in it; run `usermod -aG {name} <daemon user>` or clear socketGroup"
            ) from None
