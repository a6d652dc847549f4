"""The test tree. A regular package only so that ``tests.support`` imports from the repository root (pytest,
and ``python -m bench.x`` from the root): rt-utils installs a top-level ``tests``
package into site-packages, which would shadow a namespace package of that name."""
