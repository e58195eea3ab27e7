"""The shared fixtures of tests/support.py, for every module under tests/."""

from support import group, mariadb, postgres  # noqa: F401  (fixtures)
