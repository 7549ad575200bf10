"""Facts both sides of the queue agree on: task name, queue, Redis key layout, id patterns,
the untrained-model warning, class lists and the palette.

The gateway calls the worker's task by name (`TASK_PARSE`) and never imports worker code. Each
fact has this one copy: the gateway, the worker, the docs' tests and the OpenAPI document import it.
"""

from __future__ import annotations

import re

TASK_PARSE = "m2fp.parse"
QUEUE = "m2fp"
# Flower's Redis ACL (after `user flower on >password`): subscribe to the event stream of db 0,
# bind its own event queue, read queue lengths; no PUBLISH (so no remote control through the
# pidbox), no CLIENT KILL/PAUSE, CONFIG, FLUSH*, and no job key. scripts/make_secrets.sh writes
# the same rules (a test compares them) and `make run` gives its Flower this user.
FLOWER_ACL_RULES = (
    "resetchannels &/0.celeryev/* resetkeys %R~m2fp %R~celery* %RW~_kombu.binding.celeryev "
    "%RW~_kombu.binding_permanent.celeryev %RW~_kombu.binding_deadlines -@all +@connection "
    "+@transaction -client +client|setname +client|id +psubscribe +punsubscribe +llen +info +ping "
    "+select +sadd +srem +smembers +zadd +zrem +zrangebyscore +exists +time +evalsha +eval "
    "+script|load +script|exists"
)

# The weights: M2FP_WEIGHTS names a ModelScope model directory (CHECKPOINT_FILE, optional
# CONFIGURATION_FILE), a checkpoint file, or RANDOM_WEIGHTS for an explicitly untrained model.
RANDOM_WEIGHTS = "random"
CHECKPOINT_FILE = "pytorch_model.pt"  # ModelScope's ModelFile.TORCH_MODEL_FILE
ENCRYPTED_CHECKPOINT_FILE = f"{CHECKPOINT_FILE}.enc"  # `python -m worker.weights encrypt`
CONFIGURATION_FILE = "configuration.json"
# The one untrained-model warning: in every result, /readyz, the worker's start banner and logs,
# and the offline CLI, whenever the weights are RANDOM_WEIGHTS.
UNTRAINED_WARNING = (
    "UNTRAINED MODEL: M2FP runs with random weights (M2FP_WEIGHTS=random); "
    "results have the right shape but no meaning."
)

# shared.crypto.new_job_id() is token_urlsafe(18): exactly 24 URL-safe base64 characters. The
# gateway answers 404 for anything else; the worker refuses a task argument that is not one.
JOB_ID_PATTERN = "[A-Za-z0-9_-]{24}"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
# A client's X-Request-ID is echoed and logged only when it is a plain token: letters, digits and
# inner hyphens, 8 to 64 characters, starting and ending with a letter or digit (a uuid4, with or
# without hyphens, fits); anything else is replaced by a fresh uuid4 hex.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{6,62}[A-Za-z0-9]")

KEY_PREFIX = "m2fp"
LIMITER_PREFIX = "m2fp:limiter"


JOB_KEY_PREFIX = f"{KEY_PREFIX}:job:"


def job_key(job_id: str) -> str:
    """Redis hash holding a job's record (status, token hash, wrapped data key, attempts...)."""
    return f"{JOB_KEY_PREFIX}{job_id}"


def inflight_key(client_tag: str) -> str:
    """Redis sorted set of one client's admitted job ids (the per-client cap on jobs in flight)."""
    return f"{KEY_PREFIX}:inflight:{client_tag}"


def input_key(job_id: str) -> str:
    """Redis string holding a job's encrypted input image."""
    return f"{KEY_PREFIX}:in:{job_id}"


def output_key(job_id: str) -> str:
    """Redis string holding a job's encrypted result."""
    return f"{KEY_PREFIX}:out:{job_id}"


WORKER_KEY_PREFIX = f"{KEY_PREFIX}:worker:"


def worker_key(name: str) -> str:
    """Redis hash a live worker process refreshes (heartbeat with a short TTL)."""
    return f"{WORKER_KEY_PREFIX}{name}"


CLAIMED_KEY_PREFIX = f"{KEY_PREFIX}:claimed:"
CLAIMERS_KEY = f"{KEY_PREFIX}:claimers"  # set of worker names that have a claimed set


def claimed_key(worker: str) -> str:
    """Redis set of the job ids a worker process has claimed and not yet ended (the reaper's)."""
    return f"{CLAIMED_KEY_PREFIX}{worker}"


# Sorted set of queued jobs by when their current message was sent, and the latest such time
# among claimed jobs: the queue is FIFO, so a job sent well before a claimed one whose message
# is neither queued nor unacked lost its message (JobStore.vanished).
PENDING_KEY = f"{KEY_PREFIX}:pending"
SENT_WATERMARK_KEY = f"{KEY_PREFIX}:sent_watermark"

BAN_PREFIX = f"{KEY_PREFIX}:ban"
STRIKES_PREFIX = f"{KEY_PREFIX}:strikes"


def ban_key(client_tag: str) -> str:
    """Redis string present while a client (by its pseudonym) serves a ban."""
    return f"{BAN_PREFIX}:{client_tag}"


def strikes_key(client_tag: str) -> str:
    """Redis counter of a client's invalid uploads in a row (expires after the ban length)."""
    return f"{STRIKES_PREFIX}:{client_tag}"


STATUSES = ("queued", "running", "done", "failed", "expired")

# CIHP classes, index = class id in label maps (SPEC §5). 20 = "Human" is an instance class only.
CIHP_CLASSES = (
    "Background", "Hat", "Hair", "Gloves", "Sunglasses", "UpperClothes", "Dress", "Coat",
    "Socks", "Pants", "Torso-skin", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
    "Left-leg", "Right-leg", "Left-shoe", "Right-shoe",
)  # fmt: skip
LIP_CLASSES = (*CIHP_CLASSES[:3], "Glove", *CIHP_CLASSES[4:10], "Jumpsuits", *CIHP_CLASSES[11:])

# A colour per class for palette PNGs and the web page (RGB), background black.
PALETTE = (
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85),
    (0, 119, 221), (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0),
    (0, 0, 255), (51, 170, 221), (0, 255, 255), (85, 255, 170), (170, 255, 85),
    (255, 255, 0), (255, 170, 0),
)  # fmt: skip
