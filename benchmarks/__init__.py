"""editflow benchmarks: one script per measurement, each printing a table and writing JSON to
``benchmarks/results/NAME.json``. See ``benchmarks/README.md`` for the commands."""
