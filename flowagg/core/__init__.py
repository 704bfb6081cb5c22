"""The foundation every stage stands on: settings, the root's layout, errors, clocks,
durable file operations, file formats, compression, thread supervision, and the entry rules
with redaction (SPEC §3), which the client, the socket, recovery and the readers all apply.

May import: only `flowagg` itself (its version constants) and the standard library and
third-party packages. Nothing here knows the daemon or any stage above it.
"""
