"""The one exception type bertedge raises for bad input; the CLI turns it into a one-line error."""


class BertedgeError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}" if fix else problem)
