"""Console output of the command-line tools.

Modules log through ``logging.getLogger(__name__)``; the library configures no handler. A tool
calls :func:`setup_logging` once: one handler on the ``cssfe`` package logger, writing to stdout
(info: the message alone, as a report reads; warnings and errors: prefixed with their level).
``--quiet`` keeps warnings and errors only, ``--log-level`` (or a run's ``logging.log_level``)
sets the level. Progress bars are separate: the ``progress`` key silences them alone.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
PACKAGE_LOGGER = "cssfe"


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname.lower()}: {message}" if record.levelno >= logging.WARNING else message


def add_verbosity_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("console output")
    group.add_argument("--quiet", "-q", action="store_true", help="print warnings and errors only (no reports, no progress bars)")
    group.add_argument("--log-level", choices=list(LEVELS), help="verbosity of the console messages (default: info; "
                       "training: the run's logging.log_level)")


def chosen_level(args: argparse.Namespace, default: str = "info") -> str:
    """The level the options ask for: ``--quiet`` wins over ``--log-level``, which wins over ``default``."""
    if getattr(args, "quiet", False):
        return "warning"
    return getattr(args, "log_level", None) or default


def setup_logging(level: str = "info", stream: Optional[object] = None) -> logging.Logger:
    """(Re)install the console handler of the ``cssfe`` loggers at ``level``; returns the package logger."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in logger.handlers if getattr(h, "cssfe_console", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    handler.cssfe_console = True
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level])
    return logger
