"""One logging setup for the ``clasp`` command: CLASP's and the libraries' messages at one level.

Libraries talk through ``logging`` (open_clip's "No pretrained weights loaded" goes to the root
logger, timm's notes, huggingface_hub's retries) or through ``warnings``; both end in one stderr
handler, at the level the user picks with ``clasp --log-level`` or ``CLASP_LOG_LEVEL`` (default:
warning). At the default level library warnings are chatter and hidden (their errors always show);
``--log-level info`` shows them.
"""

from __future__ import annotations

import logging

from pipeline.errors import ClaspError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LIBRARIES = ("open_clip", "timm", "huggingface_hub", "urllib3", "filelock", "accelerate", "torch", "webdataset")


class _LibraryChatter(logging.Filter):
    """Drop records of third-party libraries below ``threshold``, also those they send to the root logger."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.threshold:
            return True
        top = record.name.split(".")[0]
        if top == "root":
            return not any(f"/{lib}/" in record.pathname.replace("\\", "/") for lib in LIBRARIES)
        return top not in LIBRARIES


def setup_logging(level: str) -> None:
    """Route every logger and Python warning to one stderr handler at ``level`` (debug|info|warning|error)."""
    name = level.lower()
    if name not in LEVELS:
        raise ClaspError(f"log level {level!r} (--log-level / CLASP_LOG_LEVEL): choose one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_LibraryChatter(logging.ERROR if name == "warning" else LEVELS[name]))
    handler.clasp = True  # replaced, not stacked, when the command line is set up again
    root = logging.getLogger()
    root.setLevel(LEVELS[name])
    hosts = [h for h in root.handlers if not getattr(h, "clasp", False)]
    if hosts:  # run inside a program that set up logging itself (pytest, a notebook): its handlers decide
        return
    root.handlers[:] = [handler]
    logging.captureWarnings(True)
