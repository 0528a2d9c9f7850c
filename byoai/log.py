"""A logger that reports into the Prefect run when there is one, and to Python logging otherwise."""

from __future__ import annotations

import logging


def step_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:  # a step called as a plain function (bench/, notebooks)
        return logging.getLogger("byoai")
