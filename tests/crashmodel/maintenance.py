"""`python -m flowagg` with the maintenance job (journal compaction) every SECONDS instead of
every minute, so a short recorded workload reaches it: `python -m tests.crashmodel.maintenance
SECONDS --root R run ...`. The daemon is otherwise the real one."""

from __future__ import annotations

import sys

from flowagg.cli.main import main
from flowagg.service import jobs

if __name__ == "__main__":
    jobs.MAINTENANCE_INTERVAL_S = float(sys.argv.pop(1))
    main()
