"""Apply (or dry-run) patches/*.patch to the installed upstream packages. Stdlib only.

    python patches/apply.py            apply every patch (the Dockerfile does this; fails loudly)
    python patches/apply.py --check    dry-run: does each patch apply to what is installed here?
    python patches/apply.py --check patches/x.patch ...

Each patch starts with a header (see patches/README.md) naming the upstream distribution and the
exact version it was made against, and the reason; paths in the diff are relative to the directory
the distribution is installed into (site-packages), with a/ and b/ prefixes (`patch -p1`). An empty
folder is fine: nothing to do.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parent
_KEY = re.compile(r"^([A-Za-z-]+):\s*(.*)$")


class PatchError(ValueError):
    """A patch whose header is wrong, or which does not match or apply to what is installed."""


@dataclass(frozen=True)
class PatchHeader:
    package: str  # distribution name as pip knows it, e.g. megatron-core
    version: str  # the exact upstream version the diff was made against
    reason: str


def parse_header(path: Path) -> PatchHeader:
    """Read `Upstream: <dist>==<version>` and `Reason: ...` from the lines before the diff."""
    fields: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines():
        if line.startswith(("diff ", "--- ", "Index: ")):
            break
        m = _KEY.match(line)
        if m:
            last = m.group(1).lower()
            fields[last] = m.group(2).strip()
        elif last and line.startswith((" ", "\t")) and line.strip():
            fields[last] += " " + line.strip()  # continuation line of the previous field
    else:
        raise PatchError(f"{path.name}: no diff found (expected 'diff ' or '--- ' lines after the header)")
    upstream = fields.get("upstream", "")
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s]*)", upstream)
    if not m:
        raise PatchError(f"{path.name}: header needs 'Upstream: <package>==<exact version>', got {upstream!r}")
    if len(fields.get("reason", "")) < 10:
        raise PatchError(f"{path.name}: header needs 'Reason: <why this patch exists>' (at least a sentence)")
    return PatchHeader(package=m.group(1), version=m.group(2), reason=fields["reason"])


def install_root(package: str) -> tuple[Path, str] | None:
    """(directory the distribution is installed into, installed version); None when not installed."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        return None
    return Path(dist.locate_file("")).resolve(), dist.version


def _patch(args: list[str], root: Path, path: Path) -> subprocess.CompletedProcess:
    if shutil.which("patch") is None:
        raise PatchError("the `patch` program is not installed (apt-get install patch)")
    # --fuzz=0: a patch is made against one exact version, so any drift is a failure, not a guess.
    cmd = ["patch", "-p1", "--batch", "--silent", "--fuzz=0", "-d", str(root), "-i", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def check_or_apply(path: Path, *, dry_run: bool, root: Path | None = None) -> str:
    """Returns 'applies', 'applied', 'already applied' or 'not installed'; raises PatchError otherwise.

    `root` overrides the install directory (tests); then the version is not checked.
    """
    header = parse_header(path)
    if root is None:
        found = install_root(header.package)
        if found is None:
            return "not installed"
        root, version = found
        if version != header.version:
            raise PatchError(
                f"{path.name}: made for {header.package}=={header.version} but {version} is installed; "
                f"re-make the patch against {version} (or pin {header.version})"
            )
    forward = _patch(["--forward", "--dry-run"], root, path)
    if forward.returncode != 0:
        if _patch(["--reverse", "--dry-run"], root, path).returncode == 0:
            return "already applied"  # a rebuilt layer: nothing to do
        raise PatchError(f"{path.name}: does not apply to {header.package} in {root}:\n{forward.stdout}{forward.stderr}")
    if dry_run:
        return "applies"
    done = _patch(["--forward"], root, path)
    if done.returncode != 0:
        raise PatchError(f"{path.name}: patch failed in {root}:\n{done.stdout}{done.stderr}")
    return "applied"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="dry-run only; a package that is not installed is skipped")
    ap.add_argument("patches", nargs="*", type=Path)
    args = ap.parse_args(argv)
    paths = args.patches or sorted(PATCH_DIR.glob("*.patch"))
    if not paths:
        print(f"no patches in {PATCH_DIR}")
        return 0
    failed = 0
    for path in paths:
        try:
            status = check_or_apply(path, dry_run=args.check)
            if status == "not installed" and not args.check:
                raise PatchError(f"{path.name}: {parse_header(path).package} is not installed")
        except PatchError as exc:
            print(f"FAIL {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{status:>15}  {path.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
