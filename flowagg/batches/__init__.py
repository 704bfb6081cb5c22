"""From journal to batch files: the buffer and its triggers (aggregator), the tail that
waits in the journal (spill), cuts handed on once journaled (cut_queue), the batch file
format and atomic publication (storage), runs of files written side by side, and the
start-up checks of what is already stored (replayed, published).

May import: `journal`, `core`.
"""
