"""The two kinds of failure (as Zulip's email mirror has them): bad input versus a broken system."""


class InputError(ValueError):
    """The input itself is wrong (not an email, empty, binary junk): answered with one line, logged at info."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line
