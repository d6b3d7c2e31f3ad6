"""The GPU machine's kit (.ci/gpu-kit): every package the GPU tests need there is in it or on the machine.

The GPU machine has no package registry: a dependency that nbtrain gains and the kit lacks
would only show there, as an import error in the first GPU run. This checks it here, from
the metadata of the packages installed in this environment, for Python 3.12.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

KIT_SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "gpu-kit"
GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}


def load_kit() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_kit", str(KIT_SCRIPT))  # a script: no .py suffix
    spec = importlib.util.spec_from_loader("gpu_kit", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def requirements(name: str) -> list[str]:
    """Return the packages `name` needs at run time on Python 3.12 (no extras)."""
    found = []
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(GPU_PYTHON):
            found.append(requirement.name)
    return found


def closure(roots: list[str], stop: frozenset[str] = frozenset()) -> set[str]:
    """Return `roots` and everything they need, by canonical name (not following `stop`)."""
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.add(name)
        try:
            todo += [canonicalize_name(r) for r in requirements(name)]
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed here: a platform's optional package (e.g. the nvidia-* of a CUDA torch)
    return seen


def test_the_kit_and_the_gpu_machine_hold_every_package_the_gpu_tests_need() -> None:
    kit = load_kit()
    skipped = {canonicalize_name(n) for n in kit.NOT_NEEDED}
    needed = closure([*requirements("nbtrain"), *kit.TESTS_NEED], stop=frozenset(skipped))
    present = closure(list(kit.MACHINE_HAS)) | {canonicalize_name(n) for n in (*kit.PACKAGES, kit.DEEPSPEED)}
    missing = sorted(needed - present - {"nbtrain"})
    assert not missing, (f"the GPU machine would lack {', '.join(missing)}: add them to PACKAGES in .ci/gpu-kit "
                         "(and rebuild the kit), or to MACHINE_HAS if the GPU machine has them")


def test_the_kit_pins_what_this_environment_runs() -> None:
    kit = load_kit()
    pins = kit.pinned_versions(kit.VENV_PYTHON)
    assert set(pins) == {*kit.PACKAGES, kit.DEEPSPEED}
    assert pins[kit.DEEPSPEED] == importlib.metadata.version("deepspeed")
