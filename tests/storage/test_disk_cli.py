"""``xenswap disk ...`` end to end through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenswap.cli import main


def test_disk_cli_round_trip(tmp_path: Path, golden_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", str(tmp_path / "st")]
    assert main(["disk", "golden", "img", "--from", str(golden_image), *store]) == 0
    assert main(["disk", "branch", "img", "vm", *store]) == 0
    assert main(["disk", "snapshot", "vm", "snap", *store]) == 0
    assert main(["disk", "branch", "snap", "vm2", *store]) == 0
    assert main(["disk", "commit", "vm", *store]) == 0
    assert main(["disk", "compact", "vm2", *store]) == 0
    assert main(["disk", "export", "vm", str(tmp_path / "d.delta"), "--layer", "all", *store]) == 0
    assert main(["disk", "import", str(tmp_path / "d.delta"), "vm3", "--onto", "img", *store]) == 0
    capsys.readouterr()
    assert main(["disk", "list", "--json", *store]) == 0
    listing = {o["name"]: o for o in json.loads(capsys.readouterr().out)}
    assert set(listing) == {"img", "vm", "snap", "vm2", "vm3"}
    assert listing["snap"]["read_only"] and not listing["vm"]["read_only"]
    assert main(["disk", "tree", "--json", *store]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in tree] == ["img"]
    children = {c["name"]: c for c in tree[0]["children"]}
    assert "snap" in [c["name"] for c in children["vm"]["children"]]
    # Errors are one clear line and exit 1.
    assert main(["disk", "rm", "img", *store]) == 1
    assert "is used by" in capsys.readouterr().err
    assert main(["disk", "branch", "nope", "x", *store]) == 1
    assert "no image, disk or snapshot named 'nope'" in capsys.readouterr().err
    assert main(["disk", "golden", "bad name", "--size", "1M", *store]) == 1
    assert main(["disk", "rm", "vm", "vm2", "vm3", "snap", "img", *store]) == 0
    capsys.readouterr()
    assert main(["disk", "list", "--json", *store]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not list((tmp_path / "st" / "data").glob("*.blk"))
