"""The one exception type for bad user input: the CLI prints its message on one line and exits with 2."""


class UserError(Exception):
    """Bad input from the user (config value, path, env id, file contents).

    The message must be one line, name the bad value and say what to do instead.
    """

    exit_code = 2
