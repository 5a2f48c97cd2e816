"""Errors the CLI turns into one line on stderr and exit code 2."""


class CliError(Exception):
    """A user-facing problem: bad arguments, a missing directory, a bad config."""
