"""What every command-line entry point of the project shares: an error the user can fix is one line on
stderr and exit status 2, not a traceback."""
from __future__ import annotations

import functools
import sys

USAGE_ERROR = 2  # argparse's status for a wrong command line; a wrong file or value is the user's to fix too


def report(error: BaseException) -> int:
    """Print ``error: <message>`` on stderr; returns the exit status for it."""
    print(f'error: {error}', file=sys.stderr)
    return USAGE_ERROR


def one_line_errors(*errors: type[BaseException]):
    """Decorate a ``main(argv) -> int``: the ``errors`` it raises are :func:`report`-ed instead of raised."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except errors as e:
                return report(e)
        return run
    return wrap
