"""flowagg's benchmark (SPEC §10), one module per figure group; run it with scripts/bench."""
