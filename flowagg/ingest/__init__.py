"""How entries come in: the socket server and its peers, the request shape check, rate
limits, spool intake and its trust rules, resend gating on entry ids, and the pipeline that
journals, acknowledges and feeds the buffer.

May import: `delivery`, `batches`, `journal`, `core`. The pipeline drives the stages below
it, so ingest sits above them; the entry rules it shares with readers live in `core`.
"""
