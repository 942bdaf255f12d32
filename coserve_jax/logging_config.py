"""Logging of the library and the server, with the standard :mod:`logging` module, configured once.

Every module logs to a child of the ``coserve_jax`` logger (``coserve_jax.engine``,
``coserve_jax.serve`` ...). As vLLM does (``VLLM_CONFIGURE_LOGGING``), importing the package gives
that logger one handler to stdout at INFO, so a notebook sees the engine's start-up progress;
``COSERVE_JAX_CONFIGURE_LOGGING=0`` leaves logging to the application, and
``COSERVE_JAX_LOGGING_LEVEL`` sets the level. The server instead applies
:func:`logging_config` once, which also carries uvicorn's loggers (its error log and, unless
``--disable-log-requests``, its access log: one line per request), so every line has one format.

Line format (vLLM's): ``INFO 12-01 23:30:01 [coserve_jax.engine] message``.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import sys

LOGGER = "coserve_jax"
FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
DATEFMT = "%m-%d %H:%M:%S"


def logging_config(level: str = "info", access_log: bool = True) -> dict:
    """A :func:`logging.config.dictConfig` dict for the server: uvicorn's loggers (its own
    config, ``uvicorn.config.LOGGING_CONFIG``) with our format, plus the ``coserve_jax`` logger.

    Args:
        level: ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` or ``"critical"``.
        access_log: keep uvicorn's access log (one line per HTTP request).
    Raises:
        ValueError: an unknown level.
    """
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log level must be debug, info, warning, error or critical, got {level!r}")
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["formatters"]["coserve"] = {"format": FORMAT, "datefmt": DATEFMT}
    cfg["formatters"]["access"] = {
        "()": "uvicorn.logging.AccessFormatter", "datefmt": DATEFMT, "use_colors": False,
        "fmt": '%(levelname)s %(asctime)s [uvicorn.access] %(client_addr)s "%(request_line)s" %(status_code)s',
    }
    cfg["handlers"]["coserve"] = {"formatter": "coserve", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"}
    cfg["handlers"]["default"] = dict(cfg["handlers"]["coserve"])
    cfg["loggers"][LOGGER] = {"handlers": ["coserve"], "level": name, "propagate": False}
    cfg["loggers"]["uvicorn"]["level"] = name
    cfg["loggers"]["uvicorn.error"]["level"] = name
    if not access_log:
        cfg["loggers"]["uvicorn.access"] = {"handlers": [], "level": "WARNING", "propagate": False}
    return cfg


def configure_logging(level: str = "info", access_log: bool = True) -> dict:
    """Apply :func:`logging_config` (the server, at start-up). Returns the dict, for
    ``uvicorn.Config(log_config=...)``.

    Raises:
        ValueError: an unknown level.
    """
    cfg = logging_config(level, access_log)
    logging.config.dictConfig(cfg)
    return cfg


class _StdoutHandler(logging.StreamHandler):
    """A handler to whatever ``sys.stdout`` is when a record is written (notebooks and test
    runners replace it after import)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure_library_logging() -> None:
    """Give the ``coserve_jax`` logger a stdout handler at ``$COSERVE_JAX_LOGGING_LEVEL``
    (default INFO) unless ``$COSERVE_JAX_CONFIGURE_LOGGING`` is ``0`` or it has a handler
    already (called once, when the package is imported)."""
    if os.environ.get("COSERVE_JAX_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger(LOGGER)
    if logger.handlers:
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("COSERVE_JAX_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False
