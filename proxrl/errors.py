"""The exception types for bad input: the CLI prints the message on one line and exits with its code.

Exit codes: 2 for bad input from the user (a config value, a path, an env id, a file's contents), 1 for a failure
inside user code (a reward function, an env factory or env that raises). Tracebacks are printed only with
``--debug`` or ``PROXRL_DEBUG=1``.
"""


class UserError(Exception):
    """Bad input from the user (config value, path, env id, file contents).

    The message must be one line, name the bad value and say what to do instead.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UserCodeError(UserError):
    """A failure inside the user's own code (reward function, env factory, env ``step``/``reset``): exit 1."""

    exit_code = 1
