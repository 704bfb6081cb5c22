"""Reading what was stored, without a daemon: batch file discovery and selection,
validate, export, report and diagnostics, and how they are shown (readout).

May import: `service` (its health snapshot reader), `delivery`, `batches`, `journal`,
`core`.
"""
