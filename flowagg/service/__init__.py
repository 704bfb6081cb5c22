"""The daemon's life: start, signals, reload and stop (daemon), the narrow views its
helpers get of it (daemon_host), scheduled jobs, socket operations, health snapshots,
metrics, cleanup, logs and sd_notify.

May import: `ingest`, `delivery`, `batches`, `journal`, `core`.
"""
