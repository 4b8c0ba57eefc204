"""Developer tools: `make cluster` (tools/cluster.py) and the PostgreSQL lookup that the
tests, the benchmarks, the fault matrix and `make cluster` share (tools/pg.py)."""
