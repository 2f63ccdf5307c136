"""The one exception type for errors a user can cause."""


class AutopruneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The command line turns it into a single line on stderr and a non-zero exit code;
    library callers can catch it like any other exception.
    """


class SettingError(AutopruneError):
    """A setting out of range, of the wrong type or unusable; `name` is the setting's (the
    command line names its flag instead)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"setting {name}: {message}")
        self.name, self.detail = name, message
