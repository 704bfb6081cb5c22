"""Where batches go and what happens when they cannot: the flusher that writes or
delivers each batch, the sinks (HTTP, command, PostgreSQL) and their breaker, the failed
batch format, and the recovery loop that retries, abandons and quarantines.

May import: `batches`, `journal`, `core`.
"""
