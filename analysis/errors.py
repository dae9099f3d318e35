"""The one exception type for bad user input, shared by every layer of semprobe.

The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""

import importlib.util


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


def require_extra(module: str, extra: str, needed_by: str) -> None:
    """An :class:`InputError` naming the pip extra to install when the optional package ``module`` is absent.

    Looked up without importing it: foolbox, for one, pulls in scipy and GitPython.
    """
    if importlib.util.find_spec(module) is None:
        raise InputError(
            f"{needed_by} needs the package {module}, which is not installed: pip install 'semprobe[{extra}]'"
        )
