"""What the scheduler and worker daemons share and producers never need.

toolkit.py: the run loop, consumer groups, settings published in Redis, reading a
job entry, the errors of requests that never started. scripts.py: the daemons'
Lua scripts. recovery.py: handing requests back for another attempt.
metrics.py: both daemons' Prometheus series. Imports no torch and nothing of
the scheduler or workers.
"""
