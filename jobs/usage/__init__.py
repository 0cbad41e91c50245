"""What teams used: the pure arithmetic (`accounting`: core-hours split by day, cost,
wait sketches, burn-down), the roll-up into daily tables (`rollup`), the reads for
the dashboards and the API (`selectors`), their figures (`charts`) and pages.

`accounting` imports no Django (checked by import-linter)."""
