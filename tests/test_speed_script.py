"""`benchmarks.speed` runs end to end (tiny shapes, CPU, the eager fixed-shape path) and writes what the README
reads: speedup keys, the cost model's ratio, acceptance under the seeded control."""

import json

from rsd_generation.benchmarks import speed


def test_speed_script_writes_its_results(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--tiny", "--batch-sizes", "1", "2", "--schedules", "eager", "2", "--new-tokens", "40",
            "--prompt-tokens", "8", "--step-tokens", "4", "--modes", "static", "--no-static", "--no-assisted",
            "--repeats", "1", "--baseline-repeats", "1", "--output", str(out)]  # fmt: skip
    speed.main(argv)
    row, row2 = json.loads(out.read_text())["rows"]
    rsd = row["modes"]["static"]["rsd"]
    assert rsd["accept80"]["acceptance_rate"] == 0.8 and rsd["accept50"]["acceptance_rate"] == 0.5  # seed 16
    assert set(rsd) == {"accept80", "accept50", "accept80-schedule-2", "accept50-schedule-2"}
    assert row["sd_seconds"] > 0 and rsd["accept80"]["speedup_vs_sd"] == row["sd_seconds"] / rsd["accept80"]["seconds"]
    rsd2 = row2["modes"]["static"]["rsd"]
    assert rsd2["accept80-schedule-2"]["schedule"] == 2 and rsd2["accept80"]["ticks"]["draft"] > 0
    for r in rsd.values():
        assert r["speedup_vs_best_target_only"] == row["target_only_seconds"][row["best_target_only"]] / r["seconds"]
        assert r["measured_over_predicted"] > 0
    assert row["best_target_only"] in ("target_alone_static", "target_generate_eager")
