"""`benchmarks.speed` runs end to end (tiny shapes, CPU, the eager fixed-shape path) and writes what the README
reads: speedup keys, the cost model's ratio, acceptance under the seeded control."""

import json

import pytest
import torch
from rsd_generation.benchmarks import speed

import rsd_generation as rsd


def test_speed_script_writes_its_results(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--tiny", "--batch-sizes", "1", "2", "--schedules", "eager", "2", "--new-tokens", "40",
            "--prompt-tokens", "8", "--step-tokens", "4", "--modes", "static", "--no-static", "--no-assisted",
            "--repeats", "1", "--baseline-repeats", "1", "--output", str(out)]  # fmt: skip
    speed.main(argv)
    row, row2 = json.loads(out.read_text())["rows"]
    rsd = row["modes"]["static"]["rsd"]
    assert rsd["accept80"]["acceptance_rate"] == 0.8 and rsd["accept50"]["acceptance_rate"] == 0.5  # seed 16
    agreeing = {f"accept80-rsd-sd-gamma4-agreement{a}" for a in (0.6, 0.8)}  # the token agreement control
    assert set(rsd) == {"accept80", "accept50", "accept80-schedule-2", "accept50-schedule-2"} | agreeing
    for name in agreeing:
        assert rsd[name]["acceptance_rate"] == 0.8 and rsd[name]["speedup_vs_sd_same_agreement"] > 0
    assert set(row["sd_seconds_agreement"]) == {"0.6", "0.8"}
    assert row["sd_seconds"] > 0 and rsd["accept80"]["speedup_vs_sd"] == row["sd_seconds"] / rsd["accept80"]["seconds"]
    rsd2 = row2["modes"]["static"]["rsd"]
    assert rsd2["accept80-schedule-2"]["schedule"] == 2 and rsd2["accept80"]["ticks"]["draft"] > 0
    for r in rsd.values():
        assert r["speedup_vs_best_target_only"] == row["target_only_seconds"][row["best_target_only"]] / r["seconds"]
        assert r["measured_over_predicted"] > 0
        wide, per = r["chunk_positions"], row["modes"]["static"]["ms_per_prefill_position"]
        assert wide["target"] >= 8 and wide["draft"] >= 8  # one prompt of 8 tokens, prefilled by each at least
        extra = sum(wide[role] * per[role] for role in ("draft", "target")) / 1e3
        assert r["predicted_seconds_with_chunks"] == pytest.approx(r["predicted_seconds"] + extra)
        shapes = r["device_time_by_shape"]  # the forwards by shape add up to the forwards the run made
        assert shapes["forwards"] == r["forward_calls"] and shapes["eager_forwards"] == r["forward_calls"]  # CPU
        # each eager forward (here all of them) timed in the run: part of the run's time, none left uncharged
        assert all(shapes["eager_seconds"][role] > 0 for role in ("draft", "target", "reward"))
        assert shapes["seconds"] == pytest.approx(sum(shapes["eager_seconds"].values()))
        assert shapes["seconds"] < r["seconds"]
    assert row["best_target_only"] in ("target_alone_static", "target_generate_eager")
    static = row["modes"]["static"]
    assert all(v >= 0 for v in static["ms_per_prefill_position"].values())
    for role in ("draft", "target"):  # per forward against what it must read, at the bandwidth measured in the run
        assert static["floor_ms"][role] > 0
        assert static["ms_per_forward_over_floor"][role] == static["ms_per_forward"][role] / static["floor_ms"][role]
    assert row2["modes"]["static"]["floor_ms"]["target"] > static["floor_ms"]["target"]  # two rows read more KV


def test_a_queue_run_appends_its_rows(tmp_path):
    """`--queue-prompts` sends 4 prompts through 2 slots (the baselines 2 at a time), and `--append` adds the row to
    an earlier output, each row with its own command; an output of other versions is refused."""
    out = tmp_path / "speed.json"
    common = ["--tiny", "--new-tokens", "16", "--prompt-tokens", "8", "--step-tokens", "4", "--modes", "static",
              "--no-static", "--no-assisted", "--repeats", "1", "--baseline-repeats", "1",
              "--output", str(out)]  # fmt: skip
    speed.main(["--batch-sizes", "1", *common])
    speed.main(["--batch-sizes", "2", "--queue-prompts", "4", "--catch-up", "auto", "along", "--append", *common])
    first, queued = json.loads(out.read_text())["rows"]
    assert (first["batch_size"], first["prompts"]) == (1, 1) and (queued["batch_size"], queued["prompts"]) == (2, 4)
    assert "--queue-prompts 4" in queued["command"] and "--queue-prompts" not in first["command"]
    rsd = queued["modes"]["static"]["rsd"]["accept80"]
    along = queued["modes"]["static"]["rsd"]["accept80-catch-up-along"]  # --catch-up: both, side by side
    assert (rsd["catch_up"], along["catch_up"]) == ("lazy", "along")  # auto: lazy on the static path
    assert along["acceptance_rate"] == rsd["acceptance_rate"] and along["forward_calls"] == rsd["forward_calls"]
    assert rsd["tokens_per_s"] == 4 * 16 / rsd["seconds"]
    assert rsd["forward_calls"]["target"] > 0
    data = json.loads(out.read_text())
    data["versions"]["torch"] = "0.0"
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="was measured on"):
        speed.main(["--batch-sizes", "1", "--append", *common])


def test_the_token_agreement_control_sets_how_many_proposals_the_target_keeps():
    """Under the control at agreement 1 the target keeps every proposed token (one verification per γ + 1 tokens),
    at 0 none (one per token, as random models give), in between about a share a / (1 - a) per verification; the
    control is gone outside its block."""

    small = {**speed.QWEN_7B, **speed.TINY, "vocab_size": 300}  # untied heads: tied ones repeat their input
    draft = speed.random_model(small, 1, "cpu", torch.float32)
    target = speed.random_model({**small, "hidden_size": 96}, 2, "cpu", torch.float32)
    ids = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
              do_sample=False, gamma=4, fast_path="static", return_dict_in_generate=True)  # fmt: skip

    def stats(a=None):
        if a is None:
            return rsd.speculative_generate(target, draft, **kw).rsd_stats
        with speed.token_agreement(target, a, seed=0):
            return rsd.speculative_generate(target, draft, **kw).rsd_stats

    def verifications(a=None):
        return stats(a)["row_target_forwards"]

    assert verifications(1.0) == [9, 9]  # the prefill gives 1 token, then 5 per verification: 1 + ceil(39 / 5)
    # the draft keeps the proposal tokens the target accepts: each position once (the last token is never fed)
    assert stats(1.0)["row_forward_tokens"]["draft"] == [6 + 40 - 1] * 2
    assert verifications(0.0) == [40, 40]
    assert all(10 < v < 30 for v in verifications(0.6))  # expected 40 / (1 + 0.6 + 0.36 + 0.22 + 0.13) ≈ 17
    assert verifications() == [40, 40]  # outside the block: random models agree on nothing


def test_the_compile_cache_script_runs_fresh_processes(tmp_path):
    """`benchmarks.compile_cache` runs the speed script in fresh processes sharing one cache folder and keeps each
    process's first-use and wall seconds (here the static path on tiny shapes: the script's own plumbing)."""
    from rsd_generation.benchmarks import compile_cache

    out = tmp_path / "cache.json"
    compile_cache.main(["--tiny", "--mode", "static", "--runs", "2", "--new-tokens", "8", "--output", str(out)])
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and data["mode"] == "static"
    for run in data["runs"]:
        assert run["process_seconds"] > run["first_use_seconds"] > 0
        assert run["ms_per_forward"]["draft"] > 0
    with pytest.raises(SystemExit):  # an existing result is kept unless --force
        compile_cache.main(["--tiny", "--mode", "static", "--runs", "1", "--output", str(out)])


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """The output is written after each measurement: a run stopped during its second RSD case (a device call's time
    limit, say) leaves the per-forward times and the first case on disk, marked incomplete, and `--append` refuses
    to build on it."""
    out = tmp_path / "speed.json"
    real, calls = speed.timed, []

    def cut_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "timed", cut_at_the_second)
    argv = ["--tiny", "--batch-sizes", "1", "--new-tokens", "8", "--prompt-tokens", "4", "--step-tokens", "4",
            "--modes", "static", "--no-static", "--no-assisted", "--no-generate", "--no-sd", "--repeats", "1",
            "--output", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        speed.main(argv)
    saved = json.loads(out.read_text())
    row = saved["rows"][0]
    assert not saved["complete"] and not row["complete"]
    assert row["modes"]["static"]["ms_per_forward"]["draft"] > 0
    assert list(row["modes"]["static"]["rsd"]) == ["accept80"]  # the case that finished, not the one cut
    with pytest.raises(SystemExit, match="interrupted run"):
        speed.main([*argv, "--append"])


def test_kernel_variants_are_measured_side_by_side(tmp_path, capsys):
    """`--variants` measures each path once per kernel variant in one process, names the rows PATH+VARIANT, and
    leaves the kernel switches as they were."""
    from rsd_generation import kernels

    out = tmp_path / "variants.json"
    argv = ["--tiny", "--batch-sizes", "1", "--new-tokens", "8", "--prompt-tokens", "4", "--modes", "static",
            "--variants", "kernels", "no-kernels", "skinny", "--no-rsd", "--no-sd", "--no-static",
            "--no-assisted", "--no-generate", "--repeats", "1", "--output", str(out)]  # fmt: skip
    before = [getattr(kernels, flag) for flag in speed.KERNEL_FLAGS]
    speed.main(argv)
    assert before == [getattr(kernels, flag) for flag in speed.KERNEL_FLAGS]
    modes = json.loads(out.read_text())["rows"][0]["modes"]
    variants = ("kernels", "no-kernels", "skinny")
    assert {name: m["kernels"] for name, m in modes.items()} == {f"static+{v}": v for v in variants}
    assert all(m["ms_per_forward"]["draft"] > 0 for m in modes.values())
    with pytest.raises(SystemExit):
        speed.main([*argv[:-2], "--output", str(tmp_path / "other.json"), "--no-kernels"])
    assert "--variants replaces --no-kernels" in capsys.readouterr().err


def test_the_host_profile_script_records_each_run_and_refuses_to_overwrite(tmp_path, capsys):
    """`benchmarks.host_profile --tiny` times each run with what it paid once (the first run builds the static
    caches), profiles one more, and leaves an existing output alone without --force."""
    from rsd_generation.benchmarks import host_profile

    out = tmp_path / "host.json"
    argv = ["--tiny", "--batch-size", "2", "--runs", "2", "--new-tokens", "8", "--top", "5", "--output", str(out)]
    host_profile.main(argv)
    result = json.loads(out.read_text())
    assert [set(r) for r in result["runs"]] == [
        {"seconds", "capture_seconds", "triton_compilations", "forward_calls", "forward_tokens", "padded_tokens",
         "chunk_positions"}
    ] * 2  # fmt: skip
    first, second = result["runs"]
    for key in ("forward_calls", "forward_tokens", "padded_tokens", "chunk_positions"):
        assert first[key] == second[key], key  # the same seeded decisions, the same work
    assert first["chunk_positions"]["draft"] >= 2 * 8  # the draft prefilled two 8-token prompts at least
    assert result["runs"][0]["forward_calls"]["draft"] > 0
    assert len(result["by_own_time"]) == 5 and result["by_cumulative_time"][0]["cumtime_s"] > 0
    assert result["syncs_by_line"] is None  # counted on a GPU only
    before = out.read_text()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        host_profile.main(argv)
    assert out.read_text() == before
    with pytest.raises(SystemExit):
        host_profile.main([*argv[:-2], "--runs", "0", "--output", str(tmp_path / "other.json")])
    assert "--runs must be >= 1, got 0" in capsys.readouterr().err


def test_timing_warms_up_until_a_run_captures_nothing(monkeypatch):
    """`speed.timed` keeps warming up while runs still capture graphs (at most three warm-ups), then times."""
    captured = {"seconds": 0.0}
    calls = []

    def run():  # the first two runs capture
        calls.append(len(calls))
        if len(calls) <= 2:
            captured["seconds"] += 1.0
        return len(calls)

    monkeypatch.setattr(speed, "_capture_seconds", lambda: {"draft": captured["seconds"]})
    last, _, times = speed.timed(run, 2)
    assert len(calls) == 5 and last == 5 and len(times) == 2  # three warm-ups (the third captured nothing)
    calls.clear()
    captured["seconds"] = 0.0
    always = lambda: (calls.append(0), captured.__setitem__("seconds", captured["seconds"] + 1))
    speed.timed(always, 1)
    assert len(calls) == 4  # never settles: three warm-ups at most, then the timed run


def test_gemm_forms_all_compute_the_projection():
    """Every form `benchmarks.gemm_forms` times computes `x W^T` over every weight (the transposed ones give its
    transpose), so the timings compare the same work."""
    from rsd_generation.benchmarks import gemm_forms

    for M in (1, 4):
        x = torch.randn(M, 24)
        weights = [torch.randn(40, 24) for _ in range(3)]
        transposed = [w.t().contiguous() for w in weights]
        forms = gemm_forms.forms(x, weights, transposed)
        assert set(forms) == {"linear", "linear_strided_x", "x@Wt", "W@x.T"} | ({"mv"} if M == 1 else set())
        for name, fn in forms.items():
            outs = fn()
            assert len(outs) == len(weights), name
            for w, out in zip(weights, outs, strict=True):
                want = x @ w.T
                got = out.reshape(want.shape[1], M).T if name in ("W@x.T", "mv") else out
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_the_gemv_sweep_covers_the_configurations_the_fast_path_tries(tmp_path, capsys):
    """Every `kernels.GEMV_CONFIGS` entry lies in `benchmarks.gemv_sweep`'s grid (the sweep chose them), and without
    a GPU the sweep refuses to run, saying so, and writes nothing."""
    import itertools

    from rsd_generation.benchmarks import gemv_sweep

    from rsd_generation import kernels

    assert set(kernels.GEMV_CONFIGS) <= set(itertools.product(*gemv_sweep.GRID.values()))
    assert set(kernels.SKINNY_CONFIGS) <= set(itertools.product(*gemv_sweep.SKINNY_GRID.values()))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gemv_sweep.main(["--output", str(tmp_path / "sweep.json")])
        assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "sweep.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the sweep times CUDA graphs)")
def test_the_gemv_sweep_times_every_configuration_against_cublas():
    """On a GPU: the sweep keeps the fastest configurations in order, each within bfloat16 rounding of F.linear."""
    from rsd_generation.benchmarks import gemv_sweep

    for tokens in (1, 16):
        row = gemv_sweep.sweep(256, 64, bias=True, tokens=tokens, layers=2, keep=3)
        assert row["cublas_us"] > 0 and len(row["best"]) == 3
        assert [b[0] for b in row["best"]] == sorted(b[0] for b in row["best"])
        assert all(b[-1] < 0.05 for b in row["best"]), row["best"]


def test_kernel_events_keep_only_the_gpus_kernels():
    """A profile's operators repeat their kernels' device time: `kernel_events` keeps the kernels alone, so the
    kernel seconds of `host_profile` and `profile_step` count each once."""
    from types import SimpleNamespace

    from rsd_generation.benchmarks.profile_step import kernel_events, top_ops
    from torch.autograd import DeviceType

    events = [
        SimpleNamespace(key="aten::mm", device_type=DeviceType.CPU, count=2, self_device_time_total=900.0),
        SimpleNamespace(key="gemm_kernel", device_type=DeviceType.CUDA, count=2, self_device_time_total=900.0),
        SimpleNamespace(key="norm_kernel", device_type=DeviceType.CUDA, count=4, self_device_time_total=100.0),
    ]
    prof = SimpleNamespace(key_averages=lambda: events)
    kept = kernel_events(prof)
    assert [e.key for e in kept] == ["gemm_kernel", "norm_kernel"]
    assert top_ops(kept, 1, "self_device_time_total") == [{"op": "gemm_kernel", "calls": 2, "total_ms": 0.9}]


def test_projection_sweeps_keep_each_row_as_it_comes(tmp_path, capsys):
    """`gemm_forms` and `gemv_sweep` write their output after every row (a sweep cut by a time limit keeps what it
    measured), over every projection of both models, each row with its floor."""
    import json

    from rsd_generation.benchmarks import gemm_forms

    shapes = list(gemm_forms.decode_projections())
    assert len(shapes) == 10 and ("1.5b", "o", 1536, 1536) in shapes and ("7b", "down", 18944, 3584) in shapes
    result, out = {"rows": [], "complete": False}, tmp_path / "sweep.json"
    for tokens in (1, 16):
        gemm_forms.keep_row(gemm_forms.projection_row("7b", "o", tokens, 3584, 3584, 4e12), result, str(out))
        assert len(json.loads(out.read_text())["rows"]) == (1 if tokens == 1 else 2)
    row = json.loads(out.read_text())["rows"][1]
    assert row == {"model": "7b", "projection": "o", "tokens": 16, "in": 3584, "out": 3584,
                   "floor_us": pytest.approx(3584 * 3584 * 2 / 4e12 * 1e6)}  # fmt: skip
    assert "'tokens': 16" in capsys.readouterr().out


def test_a_decoded_token_launches_no_more_kernels_than_counted(tmp_path):
    """`benchmarks.launch_count` (in a process with Triton's interpreter) counts a one-token forward's launches: five
    kernels per layer with the GEMV and its fusions (qkv with the norm and rotary embedding inside, attention, o
    with the residual add, gate/up with the norm and SiLU product, down with the residual add), and no more in all
    than the 165 counted on 2026-12-08 (225 at that day's start; benchmarks/results/launch-count-interpreter*.json)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rsd_generation.benchmarks.launch_count", "--tokens", "8", "--output", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["per_layer"] == {"inside triton": 5, "inside aten": 0, "outside aten": 0, "outside triton": 0}
    assert counts["per_token_28_layers"]["total"] <= 166
