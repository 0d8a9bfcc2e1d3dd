"""The Vagrant rig for machines with hardware virtualization: validated with Debian's vagrant + vagrant-libvirt."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT = Path(__file__).resolve().parents[1] / "vagrant"

pytestmark = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant missing: make setup")


def validate(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", "validate"], cwd=folder, capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates_with_the_libvirt_provider() -> None:
    result = validate(VAGRANT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_a_wrong_provider_setting_is_caught(tmp_path: Path) -> None:
    """Proves validate really checks the libvirt block (a misspelt setting must fail)."""
    text = (VAGRANT / "Vagrantfile").read_text().replace("lv.nested = true", "lv.nestedd = true")
    (tmp_path / "Vagrantfile").write_text(text)
    shutil.copy(VAGRANT / "provision.sh", tmp_path / "provision.sh")
    result = validate(tmp_path)
    assert result.returncode != 0
    assert "nestedd" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_provision_script_is_clean() -> None:
    result = subprocess.run(["shellcheck", str(VAGRANT / "provision.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
