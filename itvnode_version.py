"""The version of the itvnode distribution, for every package of it: one owner, standard library only.

The number itself is written once, in pyproject.toml; this module reads it from the installed package
metadata (`make install`, the Docker images and any wheel install record it). A source tree that was
never installed reports `0+unknown` rather than guessing.

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

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "itvnode"
UNKNOWN = "0+unknown"


def distribution_version(name: str = DISTRIBUTION) -> str:
    """`name`'s version from the installed metadata, `UNKNOWN` when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return UNKNOWN


__version__ = distribution_version()
