"""`xenswap net apply|diff|destroy|show|graph FILE` end to end."""

from __future__ import annotations

import json
from pathlib import Path

from xenswap.cli import main
from xenswap.net import kernel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-lans.yaml"


def test_cli_round_trip(tmp_path: Path, nothing_left, capsys) -> None:
    try:
        assert main(["net", "diff", str(EXAMPLE)]) == 0
        diff = capsys.readouterr().out
        assert "+ namespace xs" in diff and "+ route 0.0.0.0/0 via 10.1.0.1" in diff
        assert main(["net", "apply", str(EXAMPLE)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(diff) and "two-lans: applied" in out  # the diff is shown before applying
        assert main(["net", "apply", str(EXAMPLE)]) == 0
        assert capsys.readouterr().out == "two-lans: up to date, nothing to change\n"
        assert main(["net", "diff", "--json", str(EXAMPLE)]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert main(["net", "show", "--json", "two-lans"]) == 0
        shown = json.loads(capsys.readouterr().out)
        rows = {(r["name"], r["interface"]): r for r in shown["entries"]}
        assert rows[("h1", "eth0")]["up"] and rows[("h1", "eth0")]["netns"] in kernel.list_namespaces()
        assert rows[("vm1", "tap/vif")]["host_device"] == rows[("r1", "eth0")]["host_device"]  # same LAN bridge
        assert main(["net", "list", "--json"]) == 0
        (listed,) = [e for e in json.loads(capsys.readouterr().out) if e["name"] == "two-lans"]
        assert listed["namespaces"] == 3 and listed["source"] == str(EXAMPLE)
        assert main(["net", "graph", str(EXAMPLE), "-o", str(tmp_path / "t.svg")]) == 0
        svg = (tmp_path / "t.svg").read_text()
        assert "<svg" in svg and "lan1" in svg and "vm2" in svg
    finally:
        main(["net", "destroy", str(EXAMPLE)])
    assert "two-lans: destroyed" in capsys.readouterr().out
    assert main(["net", "destroy", "two-lans"]) == 1
    assert "was never applied" in capsys.readouterr().err
