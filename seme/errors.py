"""User-facing errors: each becomes one line on stderr and a non-zero exit, never a traceback."""


class SemeError(Exception):
    """A problem with the user's input (config, models, options). Exit status 2."""

    exit_status = 2
