"""`neurondeck`, the command-line client: a thin client of the JSON API (/api/v1/).

It imports nothing from Django or the rest of the project (checked by import-linter),
so it installs alone on a laptop or a CI runner: `pip install .` brings only click,
requests, requests-toolbelt and PyYAML."""
