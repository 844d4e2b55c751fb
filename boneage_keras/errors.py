"""The one base class of the errors a user can fix (the ground floor: imports nothing).

Each module's own errors subclass :class:`BoneAgeError`; the command line catches it
and prints one line (what, where, how to fix) with exit code 2, never a traceback.
"""


class BoneAgeError(Exception):
    """Bad input, or a state the user can fix; the message says what and how."""

    # True: the command line exits without the interpreter's shut-down (which could
    # wait on collectives of a lost process)
    exit_at_once = False


class DataError(BoneAgeError, ValueError):
    """The data set is missing or malformed; the message says where and how to fix it."""
