"""The version of the itvnode distribution, for every package of it: one owner, importing nothing.

It lives here, a top-level module of its own beside `itvnode/`, `service/`, `worker/` and `models/`,
because all of them need it and the package rules (import-linter contracts in pyproject.toml, run by
`make lint`) leave no other single place that they may all import:
- not in `itvnode/`: that is the CLI package, on top; library code never depends on its entry point;
- not in `service/`: models/ never imports service/;
- not in `models/`: service/ never depends on models/ (the arrows are service ← worker → models);
- not one small module per side: two places that know the version would be a second owner.
It stays at the bottom of the import graph: nothing from this project, nothing but the standard library
(tests/unit/test_version.py checks it; import-linter takes only packages as roots).
"""

__version__ = "0.1.0"
