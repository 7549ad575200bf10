"""Key management commands: `python -m shared.keys new` prints a fresh keyring entry.

python -m shared.keys new [KEY_ID]     -> "KEY_ID:base64key" (default id: k<unix time>)
python -m shared.keys hash-api-key     -> reads an API key on stdin, prints its SHA-256 hash
                                          (the line to put in M2FP_API_KEYS_FILE)
python -m shared.keys new-api-key      -> prints a new API key and, on stderr, its hash line
"""

from __future__ import annotations

import secrets
import sys
import time

from shared.crypto import generate_key, hash_secret


def main(argv: list[str]) -> int:
    """Entry point; returns the exit status."""
    command = argv[0] if argv else ""
    if command == "new":
        key_id = argv[1] if len(argv) > 1 else f"k{int(time.time())}"
        print(f"{key_id}:{generate_key()}")
        return 0
    if command == "hash-api-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("error: no API key on standard input", file=sys.stderr)
            return 2
        print(hash_secret(key))
        return 0
    if command == "new-api-key":
        key = "m2fp_" + secrets.token_urlsafe(32)
        print(key)
        print(f"hash for M2FP_API_KEYS_FILE: {hash_secret(key)}", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
