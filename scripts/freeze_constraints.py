"""Write constraints.txt: the exact versions, installed in this environment, of every package that
``pip install -e ".[dev,cluster,lite]"`` brings (bloodcell's requirements and theirs, followed through the
installed packages' metadata), and nothing else that happens to be installed.

    python scripts/freeze_constraints.py            # after a full test run passed in this environment

The README's install commands and .ci/run install with ``-c constraints.txt``, so a fresh machine gets the
environment the tests passed with, and an experiment can be re-run with the versions its MLflow run
recorded (tags ``version.<package>``). Regenerate it when upgrading on purpose: loosen a pin (or delete
the file), install, run the tests, then run this script.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
#: left out, as `pip freeze` leaves them out: the packaging tools themselves (a pin on setuptools would
#: also fight pyproject.toml's build requirement when pip builds bloodcell)
TOOLS = {"pip", "setuptools", "wheel", "distribute"}


def project_requirements(extras: set[str]) -> list[Requirement]:
    """bloodcell's own requirements with ``extras``, read from pyproject.toml (the installed metadata of
    an editable install can be older than the file)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = extras - set(optional)
    if unknown:
        raise SystemExit(f"unknown extras {sorted(unknown)}; pyproject.toml has {sorted(optional)}")
    lines = project["dependencies"] + [line for extra in sorted(extras) for line in optional[extra]]
    return [Requirement(line) for line in lines]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of ``requirements`` and all they require, transitively, as
    the installed distributions' metadata says (markers evaluated for this interpreter and platform)."""
    environment = {key: str(value) for key, value in default_environment().items()}
    found: dict[str, str] = {}
    todo = [(req, {""}) for req in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({**environment, "extra": extra}) for extra in parent_extras
        ):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"installed {req.name} {dist.version} does not satisfy {req}: reinstall first")
        found[canonicalize_name(dist.metadata["Name"])] = dist.version
        todo += [(Requirement(line), set(req.extras) | {""}) for line in dist.requires or []]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="dev,cluster,lite", help="bloodcell's extras to follow")
    parser.add_argument("--output", type=Path, default=ROOT / "constraints.txt")
    args = parser.parse_args()
    pins = closure(project_requirements({e for e in args.extras.split(",") if e}))
    header = [
        '# Tested versions of everything `pip install -e ".[dev,cluster,lite]"` installs; install with',
        '#   pip install -c constraints.txt -e ".[dev,lite]"',
        f"# Written by scripts/freeze_constraints.py (Python {platform.python_version()}, "
        f"{sys.platform}/{platform.machine()}); regenerate after upgrading on purpose and running the tests.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in TOOLS]
    args.output.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {len(lines)} pins to {args.output}")


if __name__ == "__main__":
    main()
