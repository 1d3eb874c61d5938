"""The base of every error attnflow raises for bad input; the CLI prints them as one line.

A leaf module: it imports nothing of attnflow, so every layer can derive its errors from it
without pulling in the others.
"""


class UserError(Exception):
    """Bad input (a model, file, schedule or option the user gave): one clear line, no traceback."""
