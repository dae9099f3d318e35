"""The one exception type for bad user input, shared by every layer of semprobe.

The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""


class InputError(ValueError):
    """Bad input named by the user: an unknown name, a missing path, a malformed file.

    The message names the culprit and, where there is a fixed set, the valid choices.
    """


class ZeroVarianceError(InputError):
    """Rows with no variance have no correlation with anything; ``rows`` holds their indices.

    Callers that know what the rows stand for (an image, a concept, a layer) catch
    it and say so.
    """

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows
