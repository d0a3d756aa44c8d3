"""The errors the user can fix: the commands print them as one line, `Error: ...`, without a traceback."""


class UserError(Exception):
    """A one-line message saying what is wrong and how to fix it."""

    exit_code = 1


class GenerationError(UserError):
    """Bad generation options, or bad or missing packages."""


class Interrupted(UserError):
    """Ctrl-C, with what was kept."""

    exit_code = 130  # the shell's code for a process ended by SIGINT
