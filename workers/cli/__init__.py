"""The search engine's command line (`spsa-nas search|best|export|spaces`: search.py, results.py,
spaces.py), and the error every `spsa-nas` subcommand raises for input a user can fix."""


class UsageError(Exception):
    """A bad argument or input that the user can fix: printed as one line, exit status 2."""
