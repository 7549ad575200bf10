"""Build the compiled ops (deformable attention, mask readout): `python -m worker.m2fp.ops_build [--force]`.

Owns the build step that `scripts/bootstrap.sh` (so `make install`) runs: compile
`worker/m2fp/csrc/*.cpp` with `torch.utils.cpp_extension` (g++ and ninja) into `build/m2fp_ops/`,
on the machine that will run it, and record the build key (sources, flags, torch version) next to
the library; an up-to-date build is left alone. Exit status 1 when the build fails (the service
then runs on the pure-PyTorch reference and says so).
"""

from __future__ import annotations

import argparse
import sys
import time

from worker.m2fp import ops


def up_to_date() -> bool:
    """Whether the library exists and was built from the current sources, flags and torch."""
    try:
        return (
            ops.LIBRARY_PATH.is_file() and ops.BUILD_KEY_PATH.read_text().strip() == ops.build_key()
        )
    except OSError:
        return False


def build(force: bool = False, verbose: bool = False) -> bool:
    """Compile the op unless it is up to date; returns True when a new build was made."""
    if not force and up_to_date():
        ops.LIBRARY_PATH.touch()  # newer than its inputs again: bootstrap's mtime check skips python next time
        return False
    from torch.utils import cpp_extension

    ops.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    ops.BUILD_KEY_PATH.unlink(missing_ok=True)
    cpp_extension.load(
        name=ops.LIBRARY_NAME,
        sources=[str(source) for source in ops.SOURCES],
        extra_cflags=list(ops.CXX_FLAGS),
        build_directory=str(ops.BUILD_DIR),
        is_python_module=False,
        verbose=verbose,
    )
    ops.BUILD_KEY_PATH.write_text(ops.build_key() + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    """Build if needed, then load the result to prove it works."""
    parser = argparse.ArgumentParser(
        prog="python -m worker.m2fp.ops_build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    arguments = parser.parse_args(argv)
    started = time.monotonic()
    try:
        built = build(force=arguments.force, verbose=arguments.verbose)
    except (OSError, RuntimeError, ImportError) as exc:  # compiler/ninja missing, compile error
        print(f"m2fp ops: build FAILED ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    status = ops.status()
    if not status["loaded"]:
        print(f"m2fp ops: built but cannot be used: {status['reason']}", file=sys.stderr)
        return 1
    verb = f"built in {time.monotonic() - started:.0f} s" if built else "up to date"
    print(
        f"m2fp ops: {verb}: {ops.LIBRARY_PATH} ({status['build_info']}; ops={','.join(status['ops'])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
