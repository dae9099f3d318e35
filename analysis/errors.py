"""The one exception type for bad user input, shared by every layer of semprobe.

The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""


class InputError(ValueError):
    """Bad input named by the user: an unknown name, a missing path, a malformed file.

    The message names the culprit and, where there is a fixed set, the valid choices.
    """
