"""The write-ahead journal: its record format, the group-committing writer, the start-up
scan and reader, the read-only view, and the index of entry ids it rebuilds (dedupe).
An entry is acknowledged only once its add record is fsync'd here.

May import: `core`.
"""
