"""Several processes as one run through jax.distributed (2 local processes x 2 fake CPU devices,
launched through the command line as a user would in two shells): the same losses as one
process with 4 devices, checkpoints that restore into one process on another mesh, and a
'model' mesh axis that spans both processes."""

import json
import os
import shutil
import signal
import subprocess

import jax
import numpy as np
import portpicker
import pytest

from big_contrast import checkpoint, config as config_lib
from big_contrast.experiment import Experiment
from tests import runs
from tests.helpers import REPO

CONFIG = "tests/tiny_clip.py:retrieval"  # one retrieval evaluator, fed like training batches
STEPS = 6  # tiny_clip: 6 steps of 16, checkpoints at 3 and 6


def _run_processes(count: int, workdir, *flags, hook=None,
                   config=CONFIG) -> list[subprocess.CompletedProcess]:
    """Starts ``count`` processes of one run (2 fake CPU devices each) and waits for all."""
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        runs.command(config, workdir, *flags, f"--coordinator_address=localhost:{port}",
                     f"--num_processes={count}", f"--process_id={i}", hook=hook),
        cwd=REPO, env=runs.ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(count)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    for result in done:
        assert result.returncode == 0, result.stderr[-3000:]
    return done


def _run_one_process(workdir, devices: int, *flags) -> subprocess.CompletedProcess:
    env = {**runs.ENV, "JAX_NUM_CPU_DEVICES": str(devices)}
    result = subprocess.run(runs.command(CONFIG, workdir, *flags), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _results(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if k.startswith("retrieval_val/")}


def _assert_losses_equal(got: dict, expected: dict, steps) -> None:
    np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps],
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with 4 devices: the losses every layout must reproduce."""
    workdir = tmp_path_factory.mktemp("one_process") / "run"
    _run_one_process(workdir, 4)
    return runs.losses(workdir), _results(workdir)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same run as 2 processes x 2 devices; the whole train state of step 3 is dumped."""
    root = tmp_path_factory.mktemp("two_processes")
    dump = root / "state_3.npz"
    results = _run_processes(2, root / "run", hook=f"dump_state:3:{dump}")
    return root / "run", dump, results


def test_two_processes_train_like_one_process_with_four_devices(reference, two_processes):
    workdir, _, results = two_processes
    losses, evaluations = reference
    _assert_losses_equal(runs.losses(workdir), losses, range(1, STEPS + 1))
    assert evaluations and _results(workdir) == pytest.approx(evaluations, abs=1e-6)
    assert "step 6/6" in results[0].stdout and "Summary" in results[0].stdout
    # Progress lines and summaries come from process 0 only (gloo's C++ lines aside).
    assert "step 1/6" not in results[1].stdout and "Summary" not in results[1].stdout


def test_a_checkpoint_of_two_processes_restores_into_one_process_on_another_mesh(
        reference, two_processes, tmp_path):
    source, dump, _ = two_processes
    config = config_lib.apply_overrides(config_lib.load_config_file(os.path.join(REPO, CONFIG)),
                                        {"mesh.data": "1", "mesh.fsdp": "2"})
    exp = Experiment(config, jax.devices()[:2])
    ckpt = checkpoint.Checkpointer(str(source), create=False)
    try:
        state = ckpt.restore(3, exp.state_factory.abstract())
    finally:
        ckpt.close()
    saved = np.load(dump)
    leaves = jax.tree.leaves(state)
    assert len(leaves) == len(saved.files)
    for i, leaf in enumerate(leaves):  # parameters, optimizer state, EMA, step: bit-identical
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])

    # The same checkpoint continues training in one process with 2 devices, FSDP: the data
    # position carries over (nothing was skipped, so the order is exactly the uninterrupted one).
    workdir = tmp_path / "continued"
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    os.remove(workdir / "summary.json")
    result = _run_one_process(workdir, 2, "--config.mesh.data=1", "--config.mesh.fsdp=2")
    assert "Resumed from checkpoint at step 3" in result.stdout
    _assert_losses_equal(runs.losses(workdir), reference[0], range(1, STEPS + 1))


def test_a_model_axis_spanning_both_processes_trains_like_data_parallel(reference, tmp_path):
    workdir = tmp_path / "run"
    # The tiny towers' 2 attention heads do not split 4 ways; their MLPs and vocabulary do.
    results = _run_processes(2, workdir, "--config.mesh.data=1", "--config.mesh.model=4",
                             config=f"{CONFIG},heads_replicated")
    assert "'model': 4" in results[0].stdout
    _assert_losses_equal(runs.losses(workdir), reference[0], range(1, STEPS + 1))


def test_launch_flags_are_checked_before_anything_starts(tmp_path):
    result = subprocess.run(runs.command(CONFIG, tmp_path / "run", "--num_processes=2"),
                            cwd=REPO, env=runs.ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--num_processes needs --coordinator_address and --process_id" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address", ["localhost:notaport", "localhost", "localhost:70000"])
def test_a_coordinator_address_that_is_not_host_port_is_one_line(tmp_path, address):
    """Checked before jax.distributed.initialize, which crashes the process (segmentation
    fault) when its coordinator cannot parse the port."""
    result = subprocess.run(runs.command(CONFIG, tmp_path / "run",
                                         f"--coordinator_address={address}",
                                         "--num_processes=2", "--process_id=0"),
                            cwd=REPO, env=runs.ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"--coordinator_address={address} is not host:port" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
    workdir = tmp_path / "run"
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        runs.command(CONFIG, workdir, "--config.total_steps=400", "--config.checkpoint_every=400",
                     f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     f"--process_id={i}"),
        cwd=REPO, env=runs.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        runs.wait_for_step(procs[0], workdir, 3)
        procs[1].send_signal(signal.SIGTERM)  # the scheduler preempts one host
        errors = [proc.communicate(timeout=300)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], errors
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 400
    for error in errors:
        assert f"interrupted by SIGTERM at step {saved[0]}" in error
        assert "Rerun the same command" in error


def test_a_mesh_that_does_not_divide_a_parameter_is_named_before_anything_compiles():
    config = config_lib.apply_overrides(config_lib.load_config_file(os.path.join(REPO, CONFIG)),
                                        {"mesh.data": "1", "mesh.model": "4"})
    with pytest.raises(config_lib.ConfigError, match=r"attn/out_kernel \(shape \(2, 16, 32\)\) "
                       r"cannot be split 4 ways over mesh axes \('model',\)"):
        Experiment(config, jax.devices()[:4])
