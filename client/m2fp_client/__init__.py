"""Python client of the m2fp-serve human-parsing API (see client/README.md)."""

from m2fp_client.client import Client, __version__
from m2fp_client.errors import (
    BadRequest,
    Banned,
    ConnectionFailed,
    InvalidImage,
    JobExpired,
    JobFailed,
    M2FPError,
    NotFound,
    NotReady,
    ProtocolError,
    RateLimited,
    ResultGone,
    ServerUnavailable,
    Unauthorized,
    WaitTimeout,
)
from m2fp_client.results import PALETTE, Job, JobStatus, ParsingResult, Person, colorize, decode_png_map

__all__ = [
    "PALETTE", "BadRequest", "Banned", "Client", "ConnectionFailed", "InvalidImage", "Job", "JobExpired",
    "JobFailed", "JobStatus", "M2FPError", "NotFound", "NotReady", "ParsingResult", "Person", "ProtocolError",
    "RateLimited", "ResultGone", "ServerUnavailable", "Unauthorized", "WaitTimeout", "__version__",
    "colorize", "decode_png_map",
]
