"""`python -m surgery` runs the command line."""

from surgery.cli import entry

entry()
