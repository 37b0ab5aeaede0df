"""Errors meant for people: the CLI prints them as one paragraph and exits non-zero."""


class LoomError(Exception):
    """Bad input a user can fix: the message names the key, file, line or tensor."""


class ConfigError(LoomError):
    """An invalid config file or command-line override."""


class DataError(LoomError):
    """A dataset file that cannot be read or holds a bad record."""


class Interrupted(LoomError):
    """The run was asked to stop (SIGTERM / SIGINT) and saved a checkpoint first."""
