"""The scheduling simulation (`benchmarks.schedule_sim`): its limits are exact, a queue refills slots, and it reads
the per-forward times of a speed result."""

import json

import pytest
from rsd_generation.benchmarks import schedule_sim
from rsd_generation.benchmarks.schedule_sim import simulate


def test_limits_are_exact():
    every = simulate("eager", 4, 4, 8, 1.0, draft_tick=0.1, target_tick=0.3, seed=0)
    assert every["ticks"] == {"draft": 8, "target": 0} and every["seconds"] == pytest.approx(0.8)
    none = simulate("eager", 4, 4, 8, 0.0, draft_tick=0.1, target_tick=0.3, seed=0)
    assert none["ticks"] == {"draft": 8, "target": 8} and none["seconds"] == pytest.approx(3.2)
    k = simulate(4, 4, 4, 8, 0.0, draft_tick=0.1, target_tick=0.3, seed=0)  # all reject at once: same ticks
    assert k["ticks"] == none["ticks"]


def test_a_queue_refills_slots():
    """Twelve prompts through four slots, every step kept: three rounds of eight draft ticks."""
    out = simulate("eager", 4, 12, 8, 1.0, draft_tick=0.1, target_tick=0.3, seed=0)
    assert out["ticks"] == {"draft": 24, "target": 0}


def test_waiting_for_rows_saves_target_ticks():
    """At 80% and 16 rows some row rejects in nearly every round; waiting for 4 runs the target less often."""
    eager = [simulate("eager", 16, 16, 8, 0.8, 0.1, 0.3, seed)["ticks"]["target"] for seed in range(20)]
    four = [simulate(4, 16, 16, 8, 0.8, 0.1, 0.3, seed)["ticks"]["target"] for seed in range(20)]
    assert sum(four) < sum(eager)


def test_the_script_reads_a_speed_result(tmp_path):
    speed = {"device": "test", "rows": [{"batch_size": 2, "modes": {"graphs": {
        "ms_per_forward": {"draft": 1.0, "target": 4.0}, "ms_per_prm_step": 2.0}}}]}  # fmt: skip
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    out = tmp_path / "sim.json"
    argv = ["--speed", str(tmp_path / "speed.json"), "--acceptance", "1", "--policies", "eager",
            "--draft-over-target", "--seeds", "2", "--output", str(out)]  # fmt: skip
    result = schedule_sim.main(argv)
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    # every step kept: 8 draft ticks of 32 forwards at 1 ms and a 2 ms PRM step, against 8 x 32 x 4 ms
    assert row["seconds"] == pytest.approx(8 * (32e-3 + 2e-3)) and row["draft_over_target"] == 0.25
    assert row["speedup_vs_target_alone"] == pytest.approx(8 * 32 * 4e-3 / (8 * 34e-3))
    with pytest.raises(SystemExit):  # refuses to overwrite
        schedule_sim.main(argv)


def test_bad_values_are_refused_naming_them(tmp_path, capsys):
    speed = {"rows": [{"batch_size": 2, "modes": {"graphs": {"ms_per_forward": {"draft": 1, "target": 4},
                                                              "ms_per_prm_step": 2}}}]}  # fmt: skip
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    with pytest.raises(SystemExit):
        schedule_sim.main(["--speed", str(tmp_path / "speed.json"), "--acceptance", "1.5"])
    assert "[1.5]" in capsys.readouterr().err
