"""User-facing errors: bad input named by the flag, key or file at fault.

The CLI prints these as one clean line and exits with status 2 instead of a traceback.
"""


class CritnetError(ValueError):
    """Bad input from the user (a config value, a file, a data root)."""


class Interrupted(Exception):
    """An analysis stopped by Ctrl-C or SIGTERM; the message says how to continue. The model is already restored.

    Not a :class:`CritnetError`: nothing was wrong with the input, and the command line exits with status 130.
    """


def one_line(err: CritnetError) -> str:
    """The message of ``err`` as the user should see it.

    An error raised in a DataLoader worker reaches the main process re-raised by torch's ``ExceptionWrapper``
    with the same class but the worker's whole traceback as its message ("Caught X in DataLoader worker
    process 0. Original Traceback ..."); its last line ``module.X: message`` holds the original message.
    """
    message = str(err)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    cls = type(err)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


class DataError(CritnetError):
    """Data an analysis cannot evaluate: not ``(inputs, targets)`` batches, targets that are not class indices of
    the model, or no samples. The message names the batch and the value at fault."""


class ModelInputError(DataError):
    """Inputs the model rejects on its first forward pass; the message names the model, the shape it expects
    (where that can be known) and the shape it received."""


class OutputError(CritnetError):
    """A model output from which the logits cannot be read (or an ``output=`` selector that does not fit it)."""
