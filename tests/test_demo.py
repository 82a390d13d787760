"""The foundation's main job runs end to end and reports what it generated."""

from gfo import cli, demo


def test_demo_runs_and_learns(capsys):
    rows = demo.run(steps=30)
    greedy = [r for r in rows if r["decoding"] == "greedy"]
    assert len(greedy) == 3 and all(r["completion"] for r in greedy)
    assert float(rows[-1]["completion"]) < 3.0  # from ~5.6 (uniform over 259 bytes) at step 1


def test_cli_rejects_unknown_command():
    import pytest

    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        cli.main(["trian"])
