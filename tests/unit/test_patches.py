"""patches/: every *.patch has the header of patches/README.md and applies to its installed upstream.

Parametrized over the patches found (none yet: then only the checker's own tests below run, and a
collection-time note says so). A patch whose package is not installed here (the GPU-only ones:
sglang, transformer-engine) is skipped by name; the Dockerfile applies it for real.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))

_spec = importlib.util.spec_from_file_location("patches_apply", PATCH_DIR / "apply.py")
apply = importlib.util.module_from_spec(_spec)
sys.modules["patches_apply"] = apply  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(apply)

if not PATCHES:
    warnings.warn(f"no patches in {PATCH_DIR}: only the patch checker itself is tested", stacklevel=1)


@pytest.mark.parametrize("path", PATCHES, ids=lambda p: p.name)
def test_patch_header_and_applies_to_installed_upstream(path):
    header = apply.parse_header(path)  # raises naming the file and the missing field
    if apply.install_root(header.package) is None:
        pytest.skip(f"{path.name}: {header.package} is not installed here (applied in the GPU image)")
    assert apply.check_or_apply(path, dry_run=True) in ("applies", "already applied")


# The checker itself, on a throwaway "installed package".
ORIGINAL = "def scale(x):\n    return x * 2\n\n\ndef name():\n    return 'upstream'\n"
PATCHED = ORIGINAL.replace("x * 2", "x * 3")


def _make_patch(tmp_path: Path, header: str) -> tuple[Path, Path]:
    root = tmp_path / "site"
    (root / "fakepkg").mkdir(parents=True)
    (root / "fakepkg" / "mod.py").write_text(ORIGINAL)
    scratch = tmp_path / "scratch"
    for side, text in (("a", ORIGINAL), ("b", PATCHED)):
        (scratch / side / "fakepkg").mkdir(parents=True)
        (scratch / side / "fakepkg" / "mod.py").write_text(text)
    diff = subprocess.run(["diff", "-ru", "a", "b"], cwd=scratch, capture_output=True, text=True).stdout
    patch = tmp_path / "fakepkg-1.0-scale.patch"
    patch.write_text(header + diff)
    return patch, root


GOOD = "Upstream: fakepkg==1.0\nReason: scale by three, because the test says so.\n  Second line.\n\n"


def test_header_is_parsed(tmp_path):
    patch, _ = _make_patch(tmp_path, GOOD)
    h = apply.parse_header(patch)
    assert (h.package, h.version) == ("fakepkg", "1.0")
    assert h.reason == "scale by three, because the test says so. Second line."


@pytest.mark.parametrize(
    "header, message",
    [
        ("Reason: no upstream line here at all.\n", "Upstream: <package>==<exact version>"),
        ("Upstream: fakepkg>=1.0\nReason: a range is not a version.\n", "Upstream: <package>==<exact version>"),
        ("Upstream: fakepkg==1.0\n", "Reason:"),
    ],
)
def test_bad_header_names_file_and_field(tmp_path, header, message):
    patch, _ = _make_patch(tmp_path, header)
    with pytest.raises(apply.PatchError, match=message) as err:
        apply.parse_header(patch)
    assert patch.name in str(err.value)


def test_applies_then_is_idempotent_then_detects_drift(tmp_path):
    patch, root = _make_patch(tmp_path, GOOD)
    assert apply.check_or_apply(patch, dry_run=True, root=root) == "applies"
    assert (root / "fakepkg" / "mod.py").read_text() == ORIGINAL  # a dry run changes nothing
    assert apply.check_or_apply(patch, dry_run=False, root=root) == "applied"
    assert (root / "fakepkg" / "mod.py").read_text() == PATCHED
    assert apply.check_or_apply(patch, dry_run=False, root=root) == "already applied"
    # Upstream moved the line: no fuzz, a clear failure naming the patch.
    (root / "fakepkg" / "mod.py").write_text(ORIGINAL.replace("return x * 2", "return 2 * x"))
    with pytest.raises(apply.PatchError, match="does not apply"):
        apply.check_or_apply(patch, dry_run=True, root=root)


def test_installed_version_must_match(tmp_path):
    patch = tmp_path / "pyyaml-0.0.1-x.patch"
    patch.write_text("Upstream: PyYAML==0.0.1\nReason: a version nobody has installed.\n--- a/x\n+++ b/x\n")
    with pytest.raises(apply.PatchError, match=r"made for PyYAML==0.0.1 but 6\.\d+\.\d+ is installed"):
        apply.check_or_apply(patch, dry_run=True)
    missing = tmp_path / "nopkg-1-x.patch"
    missing.write_text("Upstream: no-such-dist-oreal==1.0\nReason: not installed anywhere.\n--- a/x\n+++ b/x\n")
    assert apply.check_or_apply(missing, dry_run=True) == "not installed"
    assert apply.main([str(missing)]) == 1  # applying for real requires the package


def test_empty_folder_is_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(apply, "PATCH_DIR", tmp_path)
    assert apply.main([]) == 0
    assert "no patches" in capsys.readouterr().out
