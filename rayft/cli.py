"""The command-line contract every job in ``jobs/`` shares.

``python jobs/<job>.py --config <yaml> [--set key=value ...] [--num-cpus N]``, the same under
``ray job submit``. A user's mistake (a config field, a data row, a sweep that cannot fit) ends the job with
exit code 2 and one message that names what to fix, never a traceback; anything else is a bug and raises.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable

from rayft.config import ConfigError
from rayft.readers import DataError

# Exception type -> the prefix of its message on stderr (config messages already start with the field).
USER_ERRORS: dict[type[Exception], str] = {ConfigError: "", DataError: "data error: "}


def run_job(doc: str, body: Callable[[argparse.Namespace], int], argv: list[str] | None = None, *,
            config_help: str = "YAML job config",
            set_help: str = "override a config field by dotted path, e.g. train.lr=1e-4 (repeatable)",
            user_errors: dict[type[Exception], str] | None = None,
            extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
            config_required: bool = True) -> int:
    """Parse the shared arguments, set up logging, run ``body(args)`` and turn user errors into exit code 2.
    ``extra_arguments`` adds a job's own flags (shortcuts for config fields); a job whose flags can stand in
    for a config file passes ``config_required=False`` and checks what it got itself."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, default=None, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (ignored on a cluster)")
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for chatty in ("httpx", "httpx2", "httpcore", "openai"):  # a line per HTTP request buries the job's own progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    errors = {**USER_ERRORS, **(user_errors or {})}
    try:
        return body(args)
    except tuple(errors) as e:
        prefix = next(p for t, p in errors.items() if isinstance(e, t))
        print(f"{prefix}{e}", file=sys.stderr)
        return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, process managers) ends the job like Ctrl-C: as KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _interrupt)


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM, raised as KeyboardInterrupt. Ctrl-C's handler is set again first:
    libraries a job ran before (Ray Train, Tune) may have left their own behind."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop_on_sigterm()
    while True:
        time.sleep(3600)
