"""bench/revision_bench.py reads a base revision's model modules into their own package: their
imports of each other must point at that package (a base's fusion once ran this tree's dense
products and got no Winograd plan, which made a change look 8 % faster than it was)."""

from __future__ import annotations

from bench.revision_bench import PACKAGE, pointed_at_base


def test_imports_of_the_model_modules_point_at_the_base() -> None:
    source = (
        "from worker.m2fp import dense, winograd\n"
        "from worker.m2fp import ops, winograd\n"
        "from worker.m2fp import ops\n"
        "from worker.m2fp.backbone import (\n"
        "import worker.m2fp.config as config\n"
        "x = 'worker.m2fp.dense'\n"
    )
    assert pointed_at_base(source).splitlines() == [
        f"from {PACKAGE} import dense, winograd",
        f"from {PACKAGE} import winograd",
        "from worker.m2fp import ops",  # the compiled ops stay this tree's
        "from worker.m2fp import ops",
        f"from {PACKAGE}.backbone import (",
        "import worker.m2fp.config as config",
        "x = 'worker.m2fp.dense'",
    ]
