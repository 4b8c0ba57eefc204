"""`make bench`: runservice's figures beside a bare grpc.aio server on the same machine.

Run `python -m bench --help`. The scenarios are in `scenarios.py`, the bare baseline
server in `bare.py`, the load clients (run in worker processes) in `clients.py` (the
isolation scenario's victim and abuser in `isolation.py`), and the tables, JSON and
charts in `report.py`. docs/performance.md explains the results.
"""
