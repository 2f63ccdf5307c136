"""The one exception type for errors a user can cause."""


class AutopruneError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The command line turns it into a single line on stderr and a non-zero exit code;
    library callers can catch it like any other exception.
    """
