"""The OpenAPI 3.1 description of the gateway, served at /openapi.json.

Kept as a plain dict next to the code it describes; a test checks that every route the app
serves is documented here with its methods, so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy

from shared.constants import JOB_ID_PATTERN, STATUSES
from shared.errors import JOB_ERRORS, ServiceError


def _error_codes() -> list[str]:
    """Every public error code of shared.errors (the contract clients switch on)."""
    codes, pending = set(), [ServiceError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return sorted(codes | {"bad_request", "internal_error"})


def _error(description: str, *codes: str, retry_after: bool = False) -> dict:
    response: dict = {
        "description": f"{description} Error codes: {', '.join(codes)}.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "The job id returned by POST /v1/jobs (24 URL-safe characters).",
    "schema": {"type": "string", "pattern": f"^{JOB_ID_PATTERN}$"},
}
NOT_FOUND = _error(
    "Unknown job, malformed id, or a missing or wrong token (one body for all).", "not_found"
)
UNAUTHORIZED = _error(
    "An API key is configured and X-API-Key is missing or not listed.", "unauthorized"
)
POLL_LIMITED = _error("The client's poll limit is spent.", "rate_limited", retry_after=True)
UNAVAILABLE = _error("Redis is unreachable.", "unavailable", retry_after=True)
CROSS_ORIGIN = _error(
    "A browser request from another site's page (its Origin is neither this host nor "
    "listed in M2FP_CORS_ORIGINS).",
    "cross_origin",
)
INTERNAL = _error("Unexpected failure; no detail is given.", "internal_error")
JOB_SECURITY: list[dict[str, list[str]]] = [{"jobToken": [], "apiKey": []}, {"jobToken": []}]

_DOCUMENT: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "m2fp-serve",
        "version": "1.0.0",
        "description": (
            "Multi-person human parsing (M2FP) behind a submit-and-poll API. Photos are encrypted "
            "in memory, kept in Redis only under short TTLs, never written to disk or logs; the "
            "result can be fetched exactly once. When the server has API keys configured, every "
            "/v1 call needs the X-API-Key header."
        ),
    },
    "paths": {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a photo for parsing.",
                "description": (
                    "Checks run cheapest first: request bytes, the `image` field, the file "
                    "extension (jpg, jpeg, png), the content type sniffed from the first bytes, "
                    "the dimensions read from the header, the client's rate limit, bans (after "
                    "repeated invalid uploads), and the queue's capacity."
                ),
                "security": [{"apiKey": []}, {}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image"],
                                "properties": {
                                    "image": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "A JPEG or PNG photo (.jpg, .jpeg, .png).",
                                    }
                                },
                            },
                            "encoding": {"image": {"contentType": "image/jpeg, image/png"}},
                        }
                    },
                },
                "responses": {
                    "202": {
                        "description": "Accepted and queued. Keep the token: it is shown once.",
                        "headers": {
                            "Location": {
                                "description": "The status URL.",
                                "schema": {"type": "string"},
                            }
                        },
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/JobCreated"}
                            }
                        },
                    },
                    "400": _error(
                        "No file in the `image` field, an empty file, or several files.",
                        "missing_image",
                        "bad_request",
                    ),
                    "401": UNAUTHORIZED,
                    "403": _error(
                        "Too many invalid uploads in a row: the client is banned for a while; or a "
                        "browser request from another site's page.",
                        "banned",
                        "cross_origin",
                    ),
                    "408": _error(
                        "The request body did not arrive within the gateway's read deadline.",
                        "request_timeout",
                    ),
                    "413": _error(
                        "Too many bytes in the request, or too many pixels or too long a side "
                        "in the image.",
                        "payload_too_large",
                        "image_too_large",
                    ),
                    "415": _error(
                        "The extension is not allowed, or the content does not match it.",
                        "unsupported_type",
                        "type_mismatch",
                    ),
                    "422": _error("The image header is corrupt or truncated.", "undecodable_image"),
                    "429": _error(
                        "The client's submit (or submit-attempt) limit is spent, or it already has "
                        "the most jobs allowed in flight.",
                        "rate_limited",
                        "too_many_jobs",
                        retry_after=True,
                    ),
                    "500": INTERNAL,
                    "503": _error(
                        "The queue is full or Redis is unreachable.",
                        "queue_full",
                        "unavailable",
                        retry_after=True,
                    ),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "parameters": [JOB_ID],
            "get": {
                "operationId": "getJobStatus",
                "summary": "The job's status.",
                "security": JOB_SECURITY,
                "responses": {
                    "200": {
                        "description": "The status; failed and expired jobs carry an error.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/JobStatus"}
                            }
                        },
                    },
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                    "429": POLL_LIMITED,
                    "500": INTERNAL,
                    "503": UNAVAILABLE,
                },
            },
            "delete": {
                "operationId": "deleteJob",
                "summary": "Withdraw the job: input, result and record are deleted at once.",
                "security": JOB_SECURITY,
                "responses": {
                    "204": {"description": "Deleted. A worker running it discards its output."},
                    "401": UNAUTHORIZED,
                    "403": CROSS_ORIGIN,
                    "404": NOT_FOUND,
                    "429": POLL_LIMITED,
                    "500": INTERNAL,
                    "503": UNAVAILABLE,
                },
            },
        },
        "/v1/jobs/{job_id}/result": {
            "parameters": [JOB_ID],
            "get": {
                "operationId": "getJobResult",
                "summary": "The result, exactly once (the fetch deletes it).",
                "description": "HEAD is refused (405) so that it cannot consume the result.",
                "security": JOB_SECURITY,
                "parameters": [
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "description": "`json` (default): the result document; `palette`: the label map "
                        "as a palette PNG coloured per class.",
                        "schema": {
                            "type": "string",
                            "enum": ["json", "palette"],
                            "default": "json",
                        },
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The result; it is deleted from the server by this response.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": _error("Unknown `format`.", "bad_request"),
                    "401": UNAUTHORIZED,
                    "404": NOT_FOUND,
                    "405": _error("HEAD would consume the one-time result.", "method_not_allowed"),
                    "409": {
                        "description": "The job is not done (queued, running or failed); the body "
                        "names its status. Error code: not_ready.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/NotReady"}
                            }
                        },
                    },
                    "410": _error("Already fetched, or expired.", "result_gone"),
                    "429": POLL_LIMITED,
                    "500": INTERNAL,
                    "503": UNAVAILABLE,
                },
            },
        },
        "/": {
            "get": {
                "operationId": "webPage",
                "summary": "The web page: upload, privacy notice, results.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/static/{filename}": {
            "get": {
                "operationId": "webStatic",
                "summary": "The web page's script, style sheet and icon.",
                "security": [],
                "parameters": [
                    {
                        "name": "filename",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {"description": "A static file."},
                    "404": _error("No such file.", "not_found"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the process answers.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Alive.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"const": "ok"}},
                                }
                            }
                        },
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: Redis answers and a worker is alive.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Ready.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Readiness"}
                            }
                        },
                    },
                    "503": {
                        "description": "Not ready (`status` is `unavailable` or `no_workers`).",
                        "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Readiness"}
                            }
                        },
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, for the scraper only (M2FP_METRICS_TOKEN).",
                "security": [{"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _error("No or a wrong scraper token.", "unauthorized"),
                    "404": _error("Metrics are off: no M2FP_METRICS_TOKEN is set.", "not_found"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "jobToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "The job's token from POST /v1/jobs.",
            },
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "The scraper's M2FP_METRICS_TOKEN; without one set, /metrics is 404.",
            },
            "apiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "Required on /v1 only when the server has API keys configured.",
            },
        },
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"},
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "enum": _error_codes()},
                    "message": {"type": "string"},
                },
            },
            "NotReady": {
                "type": "object",
                "required": ["error", "message", "status"],
                "properties": {
                    "error": {"const": "not_ready"},
                    "message": {"type": "string"},
                    "status": {"type": "string", "enum": list(STATUSES)},
                },
            },
            "JobCreated": {
                "type": "object",
                "required": ["job_id", "token", "status_url", "result_url", "expires_in"],
                "properties": {
                    "job_id": {"type": "string"},
                    "token": {
                        "type": "string",
                        "description": "Bearer token for this job (256 bits); "
                        "only its hash is stored.",
                    },
                    "status_url": {"type": "string"},
                    "result_url": {"type": "string"},
                    "expires_in": {
                        "type": "integer",
                        "description": "Seconds after which every trace "
                        "of the job is gone; a finished result expires sooner if not fetched.",
                    },
                },
            },
            "JobStatus": {
                "type": "object",
                "required": ["job_id", "status"],
                "properties": {
                    "job_id": {"type": "string"},
                    "status": {"type": "string", "enum": list(STATUSES)},
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "enum": sorted(JOB_ERRORS)},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
            "Result": {
                "type": "object",
                "required": [
                    "width",
                    "height",
                    "label_map_png",
                    "instance_map_png",
                    "persons",
                    "classes",
                ],
                "properties": {
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "label_map_png": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "description": "Single-channel 8-bit PNG, the upload's size; "
                        "each pixel a class id 0..19.",
                    },
                    "instance_map_png": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "description": "Single-channel 8-bit PNG; each pixel the "
                        "person index, 0 = no person.",
                    },
                    "persons": {"type": "array", "items": {"type": "object"}},
                    "precision": {
                        "type": "string",
                        "enum": ["fp32", "bf16x3", "bf16", "int8"],
                        "description": "The arithmetic the worker's network ran in "
                        "(M2FP_PRECISION); the postprocess is always fp32.",
                    },
                    "classes": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "additionalProperties": True,
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "workers", "untrained", "warnings"],
                "properties": {
                    "status": {"type": "string", "enum": ["ready", "unavailable", "no_workers"]},
                    "workers": {"type": "integer"},
                    "untrained": {"type": "boolean"},
                    "warnings": {"type": "array", "items": {"type": "string"}},
                    "precisions": {
                        "type": "object",
                        "description": "Live workers per inference precision (fp32, bf16, "
                        'int8; M2FP_PRECISION), e.g. {"fp32": 2}.',
                        "additionalProperties": {"type": "integer"},
                    },
                    "batching": {
                        "type": "object",
                        "description": "Live workers in batching mode (several jobs per "
                        "forward) and the most jobs one of their forwards takes.",
                        "properties": {
                            "workers": {"type": "integer"},
                            "max_batch": {"type": "integer"},
                        },
                    },
                },
            },
        },
    },
}


def openapi_document() -> dict:
    """A fresh copy of the OpenAPI document."""
    return copy.deepcopy(_DOCUMENT)
