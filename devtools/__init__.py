"""Development tooling on top of everything: the ``make run`` launcher, private PostgreSQL and
Redis servers, server subprocesses and workload generators for tests and benchmarks."""
