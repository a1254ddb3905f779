"""Sweeps beyond one process: two CPU ranks under `accelerate launch` give the single process's rows, each run
computed once; a killed rank costs only its unfinished run; caches of two devices merge, conflicting ones are
refused; sharded sample sets do not depend on the number of ranks; bad launches fail before any work."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from companion import bench, provenance, sharding
from companion.cli import main
from test_bench import tiny_model  # the same small random conditional UNet the sweep tests use

REPO = Path(__file__).resolve().parents[1]
QUALITY = ["class_accuracy", "class_accuracy_low", "class_accuracy_high", "class_accuracy_n"]
# one torch thread here as in the launched ranks: the thread count is part of a run's cache key (it changes timings)
pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--samplers", "ddim", "--n-samples", "32", "--metrics", "class_accuracy", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two small saved models with different weights (a 2-model grid)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed, name in ((0, "tiny-a"), (1, "tiny-b")):
        m = tiny_model()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m.name = name
        m.save(root / name, card={"recipe": "test"})
        out.append(str(root / name))
    return out


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A copy of the package for the launched processes: cache keys hold a digest of the package's source, so
    processes started a minute apart must import the same source even while the tree is being edited."""
    root = tmp_path_factory.mktemp("snapshot")
    shutil.copytree(REPO / "companion", root / "companion", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def bench_command(snapshot: Path, models, out: Path, steps: str, ranks: int) -> subprocess.Popen:
    """`companion bench` in one process, or `accelerate launch` of ``ranks`` CPU ranks (torch.distributed's launcher
    under it), in its own process group."""
    cmd = [sys.executable, "-m", "companion", "bench", "--model", ",".join(models), "--steps", steps, "--out", str(out), *ARGS]
    if ranks > 1:
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = dict(os.environ, COMPANION_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(snapshot),
               COMPANION_ASSETS=str(REPO / "assets"))
    return subprocess.Popen(cmd, cwd=snapshot, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    assert proc.returncode == 0, text[-3000:]
    return text


def stop(proc: subprocess.Popen) -> None:
    """Stop a launch and every process under it, by PID (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_tree(pid: int) -> None:
    import psutil

    p = psutil.Process(pid)
    for child in p.children(recursive=True):
        child.kill()
    p.kill()


def events(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "log").glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def test_two_ranks_give_the_single_process_rows_each_run_once(models, snapshot, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = bench_command(snapshot, models, two, "2,3", ranks=2)
    assert main(["bench", "--model", ",".join(models), "--steps", "2,3", "--out", str(one), *ARGS]) == 0
    finish(proc)
    a, b = pd.read_csv(one / "bench.csv"), pd.read_csv(two / "bench.csv")
    assert len(a) == len(b) == 4 and list(b["model"]) == ["tiny-a", "tiny-a", "tiny-b", "tiny-b"]
    pd.testing.assert_frame_equal(a[QUALITY + ["nfe"]], b[QUALITY + ["nfe"]])
    for ka, kb in zip(a["cache_key"], b["cache_key"]):  # the same key but for the source digest (this tree is live)
        ca, cb = (json.loads((d / "cache" / f"{k}.json").read_text())["config"] for d, k in ((one, ka), (two, kb)))
        ca["versions"].pop("companion_source"), cb["versions"].pop("companion_source")
        assert ca == cb
    assert set(b["rank"]) == {0, 1} and not b["cached"].any()
    assert (b["device_kind"] == "cpu").all() and (b["device_name"] == provenance.cpu_name()).all()
    computed = [e["key"] for e in events(two) if e["event"] == "computed"]
    assert sorted(computed) == sorted(b["cache_key"])  # every run exactly once across the ranks
    assert {e["world"] for e in events(two)} == {2}


def test_a_killed_rank_loses_only_its_unfinished_run(models, snapshot, tmp_path):
    out = tmp_path / "out"
    steps = "30,40,50"  # 6 runs of about a second each: long enough to kill a rank between two of its runs
    proc = bench_command(snapshot, models, out, steps, ranks=2)
    victim = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            ev = [e for e in events(out) if e["rank"] == 1] if (out / "log").is_dir() else []
            if any(e["event"] == "computed" for e in ev) and ev[-1]["event"] == "begin":
                victim = ev[-1]["pid"]
                kill_tree(victim)
                break
            time.sleep(0.05)
        assert victim is not None, "rank 1 never started a second run"
        proc.wait(timeout=120)  # the launcher stops the surviving rank
    finally:
        stop(proc)
    assert proc.returncode != 0
    assert not (out / "bench.csv").exists()  # a failed launch leaves no table
    first = [e["key"] for e in events(out) if e["event"] == "computed"]  # all by the launch (world 2)
    assert 1 <= len(first) < 6
    # the same sweep again (one process: the cache does not depend on the launcher) finishes from the cache
    finish(bench_command(snapshot, models, out, steps, ranks=1))
    df = pd.read_csv(out / "bench.csv")
    assert len(df) == 6
    again = [e["key"] for e in events(out) if e["event"] == "computed" and e["world"] == 1]
    assert not set(first) & set(again)  # nothing finished was measured twice
    assert sorted(first + again) == sorted(df["cache_key"])
    assert sorted(df.loc[df["cached"], "cache_key"]) == sorted(first)


def test_caches_of_two_devices_merge_and_conflicts_are_refused(models, tmp_path, monkeypatch, capsys):
    grid = dict(samplers=["ddim"], steps=[2], n_samples=32, metrics=("class_accuracy",), device="cpu", progress=False)
    here = sharding.distributed_sweep(models, cache_dir=tmp_path / "a", **grid)
    monkeypatch.setattr(provenance, "cpu_name", lambda: "Other CPU model")  # a second machine with another processor
    there = sharding.distributed_sweep(models, cache_dir=tmp_path / "b", **grid)
    monkeypatch.undo()
    assert not there["cached"].any()  # another device: its rows are not served from this one's
    assert main(["bench", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    merged = pd.read_csv(tmp_path / "m" / "bench.csv")
    assert len(merged) == 4 and set(merged["device_name"]) == {provenance.cpu_name(), "Other CPU model"}
    assert "2 device(s)" in capsys.readouterr().out
    # one quality key with another value: the samples were supposed to be identical
    entry = tmp_path / "a" / f"{here['cache_key'].iloc[0]}.json"
    forged = json.loads(entry.read_text())
    forged["row"]["class_accuracy"] += 0.5
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / entry.name).write_text(json.dumps(forged))
    with pytest.raises(bench.CacheConflictError, match="disagree on class_accuracy"):
        bench.merge_caches([tmp_path / "a", tmp_path / "c"], tmp_path / "m2")
    # the same run name on the same device with other weights: named by the key field that differs
    other = tiny_model()
    other.name = "tiny-a"
    bench.sweep(other, ["ddim"], [2], n_samples=32, metrics=("class_accuracy",), cache_dir=tmp_path / "d", progress=False)
    assert main(["bench", "merge", str(tmp_path / "a"), str(tmp_path / "d"), "--out", str(tmp_path / "m3")]) == 2
    assert "model_fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "m3" / "bench.csv").exists()


def test_sharded_samples_do_not_depend_on_the_number_of_ranks():
    model = tiny_model()
    for sampler in ("ddim", "euler_a"):  # euler_a draws fresh noise every step: seeded per chunk, not per rank
        one = sharding.sharded_samples(model, sampler, 3, 40, seed=7, rank=0, world=1, chunk=16)
        two = [c for r in range(2) for c in sharding.sharded_samples(model, sampler, 3, 40, seed=7, rank=r, world=2, chunk=16)]
        three = [c for r in range(3) for c in sharding.sharded_samples(model, sampler, 3, 40, seed=7, rank=r, world=3, chunk=16)]
        assert [c for c, _, _ in one] == [0, 1, 2] and [len(x) for _, x, _ in one] == [16, 16, 8]
        for split in (two, three):
            assert [c for c, _, _ in split] == [0, 1, 2]
            for (_, x, y), (_, x2, y2) in zip(one, split):
                assert torch.equal(x, x2) and torch.equal(y, y2)
        assert not torch.equal(one[0][1], one[1][1])  # chunks are different noise
    labels = torch.cat([y for _, _, y in one])
    assert torch.equal(labels, torch.arange(40) % 10)  # balanced over the whole set
    state = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    got = sharding.sharded_quality(model, "ddim", 2, 40, seed=7, metrics=("class_accuracy",), state=state, chunk=16)
    assert got["features"].shape[0] == 40 and got["measurements"]["class_accuracy"].n == 40


def test_uneven_splits_and_bad_launches(models, tmp_path):
    assert [len(p) for p in sharding.split_evenly(range(5), 2)] == [3, 2]
    assert sharding.split_evenly([1], 2) == [[1], []]
    assert sum(sharding.split_evenly(list(range(7)), 3), []) == list(range(7))
    grid = sharding.build_grid(["a", "b"], ["ddim", "euler"], [2, 3, 4])
    assert [r.index for r in grid] == list(range(12)) and [r.model for r in grid[:6]] == ["a"] * 6
    with pytest.raises(ValueError, match="models listed twice"):
        sharding.build_grid(["a", "a"], ["ddim"], [2])
    # accelerate's --cpu launcher would start one process: refused, naming the command that starts several
    env = {"ACCELERATE_USE_CPU": "True"}
    with pytest.raises(sharding.LaunchError, match="--multi_gpu --num_processes 2"):
        sharding.check_launch(env, "python accelerate launch --num_processes 2 --cpu -m companion bench")
    sharding.check_launch(env, "python accelerate launch --num_processes 1 --cpu -m companion bench")
    sharding.check_launch(dict(env, WORLD_SIZE="2"), "python accelerate launch --num_processes 2 --cpu")
    # a cache folder the ranks cannot write (a read-only file system): refused before any run, naming it
    with pytest.warns(bench.CacheWarning):
        with pytest.raises(sharding.LaunchError, match="rank 0 .*cache folder /proc/companion-cache is not writable"):
            sharding.distributed_sweep(models, ["ddim"], [2], n_samples=32, metrics=("class_accuracy",), device="cpu",
                                       cache_dir="/proc/companion-cache", progress=False)
    with pytest.raises(sharding.LaunchError, match="rank 0 .*device: device 'mps'"):
        sharding.distributed_sweep(models, ["ddim"], [2], n_samples=32, metrics=("class_accuracy",), device="mps",
                                   cache_dir=tmp_path, progress=False)
    assert main(["bench", "--model", models[0], "--steps", "2", "--out", str(tmp_path / "o"),
                 "--model", "no-such-model", *ARGS]) == 2
    assert not (tmp_path / "o" / "bench.csv").exists()


def test_companion_quality_under_two_ranks_measures_the_same_samples_as_one_process(models, snapshot, tmp_path):
    """Sharded sampling end to end: two launched CPU ranks each draw half the chunks, the main rank gathers the
    features and computes FD and class accuracy once; one process drawing every chunk gets the same numbers."""
    args = ["quality", "--model", models[0], "--sampler", "ddim", "--steps", "2", "--n", "128", "--chunk", "32",
            "--metrics", "fd,class_accuracy", "--device", "cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "companion", *args, "--out", str(tmp_path / "two.json")]
    env = dict(os.environ, COMPANION_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(snapshot), COMPANION_ASSETS=str(REPO / "assets"))
    proc = subprocess.Popen(cmd, cwd=snapshot, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    finish(proc)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert set(one["measurements"]) == set(two["measurements"]) == {"fd", "class_accuracy"}
    for name, m in one["measurements"].items():
        other = two["measurements"][name]
        assert other["n"] == m["n"] == 128
        for k in ("value", "low", "high"):  # the same samples and features; only thread scheduling may differ
            assert other[k] == pytest.approx(m[k], rel=1e-5, abs=1e-6), (name, k)


def test_companion_quality_refuses_bad_input_in_one_line(models, tmp_path, capsys):
    assert main(["quality", "--model", models[0], "--sampler", "nope", "--steps", "2", "--n", "128",
                 "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "ddim" in err  # names the bad sampler and the valid ones
    assert not (tmp_path / "x.json").exists()
