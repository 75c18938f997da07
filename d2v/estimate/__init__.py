"""Analytic estimates of a configuration, computed without running it: FLOPs per step
(`flops`), per-rank memory (`memory`), ZeRO communication volume (`comm`), and the
`python -m d2v describe` report that prints them (`describe`)."""
