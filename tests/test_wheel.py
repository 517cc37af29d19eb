"""The wheel holds what the main job needs (toy models, data sets, LICENSE) under one import name, and runs it
from another directory, with no access to the repository."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (whl,) = dist.glob("rsd_generation-*.whl")
    return whl


def test_the_wheel_carries_one_namespace_the_models_the_data_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rsd_generation"}  # no top-level `benchmarks` or `merging` to clash with other packages
    for role in ("draft", "target", "prm-small", "prm-large"):
        assert f"rsd_generation/benchmarks/toy/models/{role}/model.safetensors" in names
    for data in ("math500", "gsm8k"):
        assert f"rsd_generation/benchmarks/data/{data}/test.jsonl" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_wheel_runs_the_main_job_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "benchmarks").mkdir()  # a user's own folder of that name must not shadow ours
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rsd_generation.benchmarks as b; print(b.__file__)"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(site), where  # the installed copy, not the repository's
    run = subprocess.run(
        [sys.executable, str(site / "bin" / "rsd-bench"), "--preset", "quick", "--num-problems", "2",
         "--methods", "target", "rsd", "--deltas", "0.7", "--output", "out", "--no-plots"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((elsewhere / "out" / "summary.json").read_text())
    assert {row["method"] for row in summary["rows"]} == {"target", "rsd"}
    assert "| rsd |" in run.stdout
    merge = subprocess.run(
        [sys.executable, str(site / "bin" / "rsd-merge"), "--help"], cwd=elsewhere, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert merge.returncode == 0 and "value_head.safetensors" in merge.stdout
