"""What the benchmarks in bench/ share; not benchmarks themselves (`make bench` runs bench/*.py)."""
