"""`benchmarks.speed` runs end to end (tiny shapes, CPU, the eager fixed-shape path) and writes what the README
reads: speedup keys, the cost model's ratio, acceptance under the seeded control."""

import json

import pytest
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


def test_a_queue_run_appends_its_rows(tmp_path):
    """`--queue-prompts` sends 4 prompts through 2 slots (the baselines 2 at a time), and `--append` adds the row to
    an earlier output, each row with its own command; an output of other versions is refused."""
    out = tmp_path / "speed.json"
    common = ["--tiny", "--new-tokens", "16", "--prompt-tokens", "8", "--step-tokens", "4", "--modes", "static",
              "--no-static", "--no-assisted", "--repeats", "1", "--baseline-repeats", "1",
              "--output", str(out)]  # fmt: skip
    speed.main(["--batch-sizes", "1", *common])
    speed.main(["--batch-sizes", "2", "--queue-prompts", "4", "--append", *common])
    first, queued = json.loads(out.read_text())["rows"]
    assert (first["batch_size"], first["prompts"]) == (1, 1) and (queued["batch_size"], queued["prompts"]) == (2, 4)
    assert "--queue-prompts 4" in queued["command"] and "--queue-prompts" not in first["command"]
    rsd = queued["modes"]["static"]["rsd"]["accept80"]
    assert rsd["tokens_per_s"] == 4 * 16 / rsd["seconds"]
    assert rsd["forward_calls"]["target"] > 0
    data = json.loads(out.read_text())
    data["versions"]["torch"] = "0.0"
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="was measured on"):
        speed.main(["--batch-sizes", "1", "--append", *common])
