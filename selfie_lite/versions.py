"""The supported matrix: selfie-lite's own requirements (pyproject.toml in a checkout, else the installed metadata) and
the installed versions, read without importing any of the libraries. `selfie-lite doctor` checks one against the other."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.specifiers import SpecifierSet


# What the requirements cannot say, in one place. Every range and the minimum Python come from pyproject.toml's
# [project] table (supported_matrix says how it is found); these say which libraries doctor looks at and what it
# knows about them beyond their ranges.
CHECKED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")  # required libraries, in display order
OPTIONAL = {"bitsandbytes": ("quant", "4-bit loading")}  # optional library -> (the extra that installs it, what for)
MISSING_FIX = {"torch": "pip install torch==2.13.0 (CPU), or a CUDA build from pytorch.org"}  # instead of the pip line
# Unsloth 2026.10 pins these; a newer one breaks `import unsloth` or its patches. dist -> first version it refuses.
UNSLOTH_CAPS: dict[str, str] = {"transformers": "5.18", "trl": "1.16", "datasets": "5"}
# trl 1.15's DPOTrainer needs a GPU Triton driver: the oldest trl that trains on a machine without a GPU.
TRL_WITHOUT_GPU = "1.16"

LIBRARIES = (*CHECKED, *OPTIONAL)  # those checked against the requirements' ranges
# Everything whose version run_checks looks up.
DISTS = (*LIBRARIES, "unsloth", "kernels")

UNKNOWN_FIX = "reinstall selfie-lite (pip install -U selfie-lite, or pip install -e . in its checkout)"


def lower_bounds_first(spec) -> tuple[bool, str]:
    return spec.operator not in (">=", ">"), str(spec)


@dataclass(frozen=True)
class Requirement:
    dist: str  # distribution name, as importlib.metadata knows it
    specifier: SpecifierSet | None  # the supported versions; None: unknown, and `unknown` says why
    optional: bool = False  # missing or too old WARNs instead of FAILing
    purpose: str = ""  # of an optional library, shown when it is missing
    missing_fix: str = ""  # what to run when it is not installed, if not the pip line
    unknown: str = ""  # why the range is unknown (specifier None)

    @property
    def spec(self) -> str:
        """'>=5.0,<6': lower bounds first, as pyproject.toml writes them."""
        return ",".join(str(s) for s in sorted(self.specifier or (), key=lower_bounds_first))

    @property
    def pip(self) -> str:
        return f"pip install -U '{self.dist}{self.spec}'"

    def at_least(self, minimum: str) -> Requirement:
        """The same range with its lower bound raised to `minimum`."""
        from packaging.specifiers import SpecifierSet

        kept = [str(s) for s in self.specifier or () if s.operator not in (">=", ">")]
        return dataclasses.replace(self, specifier=SpecifierSet(",".join([f">={minimum}", *kept])))


@dataclass(frozen=True)
class Matrix:
    python: SpecifierSet | None  # Requires-Python; None: unknown
    libraries: dict[str, Requirement]  # LIBRARIES, in their order
    source: str  # where the ranges were read, or why they are unknown


def _requirement(dist: str, specifier: SpecifierSet | None, unknown: str) -> Requirement:
    extra, purpose = OPTIONAL.get(dist, ("", ""))
    return Requirement(dist, specifier, optional=bool(extra), purpose=purpose,
                       missing_fix=f"pip install 'selfie-lite[{extra}]'" if extra else MISSING_FIX.get(dist, ""),
                       unknown="" if specifier is not None else unknown)


def matrix_from_requirements(requires: list[str], requires_python: str | None, source: str) -> Matrix:
    """The matrix from requirement lines as the installed metadata lists them (`importlib.metadata.requires`:
    'trl<2,>=1.15', 'bitsandbytes>=0.45; extra == "quant"') and Requires-Python. A required library's range is
    that of the lines that apply to a plain install on this machine, an optional one's that of its extra's lines."""
    import functools
    import operator

    from packaging.requirements import Requirement as Line
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    lines = [Line(r) for r in requires]

    def specifier(dist: str) -> SpecifierSet | None:
        extra = OPTIONAL.get(dist, ("",))[0]
        found = [r.specifier for r in lines if canonicalize_name(r.name) == canonicalize_name(dist)
                 and (r.marker is None or r.marker.evaluate({"extra": extra}))]
        return functools.reduce(operator.and_, found) if found else None

    libraries = {d: _requirement(d, specifier(d), f"{source} does not name {d}") for d in LIBRARIES}
    return Matrix(python=SpecifierSet(requires_python or ""), libraries=libraries, source=source)


def pyproject_requires(project: dict) -> list[str]:
    """pyproject.toml's [project] dependencies and optional-dependencies as metadata lines: each extra's with
    `extra == "name"` added to its marker, as pip install writes them into the metadata."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement as Line

    lines = list(project.get("dependencies", []))
    for extra, requires in project.get("optional-dependencies", {}).items():
        for r in map(Line, requires):
            r.marker = Marker(f'({r.marker}) and extra == "{extra}"' if r.marker else f'extra == "{extra}"')
            lines.append(str(r))
    return lines


def source_tree_project() -> tuple[Path, dict] | None:
    """(pyproject.toml, its [project] table) of the source tree this package is imported from: a checkout, an
    editable install, PYTHONPATH. None for an installed wheel, which has no pyproject.toml beside the package."""
    import tomllib

    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    return (path, project) if project.get("name") == "selfie-lite" else None


def supported_matrix() -> Matrix:
    """The supported versions, from selfie-lite's own requirements: pyproject.toml is the single source.

    Run from a source tree (a checkout, an editable install, PYTHONPATH), its pyproject.toml is read: it belongs to
    the code that runs, while the metadata of an editable install is a copy taken at `pip install -e` time (stale
    after an edit) and may even belong to another checkout. Installed from a wheel, the metadata is read (pip wrote
    it from the same pyproject.toml). With neither, every range is unknown and its check WARNs saying so.
    """
    found = source_tree_project()
    if found is not None:
        path, project = found
        return matrix_from_requirements(pyproject_requires(project), project.get("requires-python"), str(path))
    try:
        dist = importlib.metadata.distribution("selfie-lite")
    except importlib.metadata.PackageNotFoundError:
        why = "selfie-lite is not installed and its pyproject.toml is not beside the package"
        return Matrix(python=None, libraries={d: _requirement(d, None, why) for d in LIBRARIES}, source=why)
    return matrix_from_requirements(dist.requires or [], dist.metadata["Requires-Python"],
                                    f"the metadata of the installed selfie-lite {dist.version}")


def release(version: str):
    """'5.0.0rc1' and '2.13.0+cpu' compare as 5.0.0 and 2.13.0: pre-releases and local builds count as their release."""
    from packaging.version import Version

    return Version(Version(version).base_version)


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None. Reads metadata only: never imports the package."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions(dists=DISTS) -> dict[str, str | None]:
    return {d: installed_version(d) for d in dists}
