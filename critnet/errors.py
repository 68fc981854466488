"""User-facing errors: bad input named by the flag, key or file at fault.

The CLI prints these as one clean line and exits with status 2 instead of a traceback.
"""


class CritnetError(ValueError):
    """Bad input from the user (a config value, a file, a data root)."""


class Interrupted(Exception):
    """An analysis stopped by Ctrl-C or SIGTERM; the message says how to continue. The model is already restored.

    Not a :class:`CritnetError`: nothing was wrong with the input, and the command line exits with status 130.
    """
