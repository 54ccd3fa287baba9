"""The guarantees of docs/conventions.md#runs, item by item: no lost run, no silently wrong
result, one-line errors for every mistake a user can make."""

import errno
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dvae_kernels as dk
from dvae import checkpoint as ckpt
from dvae.cli import main
from dvae.config import Config, keys_help, load_config
from dvae.data import ImageFolderImages, load_mnist
from dvae.rundir import RunDir
from dvae.trainer import Trainer, TrainingDiverged

TINY = ["progress=false", "tensorboard=false", "batch_size=16", "num_samples=4",
        "d_model=32", "mlp_hidden=[32]", "eval_every=0", "eval_samples=16", "log_every=2"]


def _train(out, *extra, rc=0, capsys=None):
    code = _main(["train", f"out_dir={out}", *TINY, *extra])
    assert code == rc
    return code


def _main(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # argparse usage errors
        return stop.code


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dvae: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + \
        env.get("PYTHONPATH", "")
    return env


# 1. An out_dir belongs to one run ---------------------------------------------------------------

def test_new_run_refuses_a_folder_with_a_checkpoint(tmp_path, capsys):
    _train(tmp_path, "steps=4")
    before = {p: (tmp_path / p).read_bytes() for p in ("checkpoint.pt", "metrics.jsonl")}
    capsys.readouterr()
    _train(tmp_path, "steps=4", rc=2)
    _one_error_line(capsys, str(tmp_path), "--resume", "--overwrite")
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    _train(tmp_path, "steps=2", "--overwrite")
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 2
    steps = [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 2]  # the new run's description, its train and test records only


def test_lock_keeps_a_second_process_out(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dvae.rundir import RunDir; "
         "r = RunDir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"locked"
        _train(tmp_path, "steps=2", rc=2)
        _one_error_line(capsys, "in use", f"pid {holder.pid}")
    finally:
        holder.kill()  # even kill -9 releases the lock: the kernel drops it with the process
        holder.wait()
        holder.stdout.close()
    _train(tmp_path, "steps=2")


def test_orphan_temporary_files_are_removed(tmp_path):
    orphan = tmp_path / "checkpoint.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    RunDir(tmp_path).release()
    assert not orphan.exists() and keep.exists()


# 2. Exact resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["lr=0.5", "batch_size=8", "seed=9", "eta_mode=learned",
                                      "vocab_size=32"])
def test_resume_refuses_result_changing_keys(tmp_path, capsys, override):
    _train(tmp_path, "steps=2")
    capsys.readouterr()
    _train(tmp_path, "steps=4", "--resume", override, rc=2)
    _one_error_line(capsys, override.split("=")[0] + "=")
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 2


def test_resume_keeps_the_checkpoint_config_and_allows_run_control(tmp_path, capsys):
    _train(tmp_path, "steps=2", "lr=0.002")
    _train(tmp_path, "--resume", "steps=4", "log_every=1", "progress=false")
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and state["config"]["lr"] == 0.002
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.002
    assert state["config"]["log_every"] == 1
    # the Python API refuses the same way
    cfg = load_config("digits", [f"out_dir={tmp_path}", *TINY, "steps=8", "lr=0.5"])
    with pytest.raises(ValueError, match=r"lr=0\.5 \(checkpoint: 0\.002\)"):
        Trainer(cfg, resume=True)
    # steps below the checkpoint's step is an error, equal is nothing to do
    capsys.readouterr()
    _train(tmp_path, "--resume", "steps=3", rc=2)
    _one_error_line(capsys, "step 4", "steps=3")
    _train(tmp_path, "--resume", "steps=4")
    assert "nothing to train" in capsys.readouterr().err


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    _train(tmp_path, "steps=4", "ckpt_every=2")
    metrics = tmp_path / "metrics.jsonl"
    # a run killed after step 4's log but before its save, mid-way through a line
    state = ckpt.load(tmp_path / "checkpoint.pt")
    state["step"] = 2
    state["batches_consumed"] = 2
    ckpt.save_atomic(state, tmp_path / "checkpoint.pt")
    with open(metrics, "a") as f:
        f.write('{"split": "train", "step": 6, "lo')
    _train(tmp_path, "steps=4", "--resume")
    records = [json.loads(s) for s in metrics.read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4]


# 3. Non-finite and out-of-range data; runs that only skip ---------------------------------------

def _npz(path, train, test=None):
    np.savez(path, x_train=train, x_test=train[:4] if test is None else test)
    return path


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_nan_pixels_are_refused_at_load(tmp_path, capsys, likelihood):
    x = np.random.rand(64, 28, 28).astype(np.float32)
    x[3, 4, 5] = np.nan
    f = _npz(tmp_path / "d.npz", x)
    _train(tmp_path / "run", "--config", "mnist", f"data_path={f}", f"likelihood={likelihood}",
           "steps=2", "latent_len=2", "vocab_size=4", rc=2)
    _one_error_line(capsys, str(f), "NaN")


def test_float_pixels_scaled_to_255_are_refused(tmp_path):
    f = _npz(tmp_path / "d.npz", (np.random.rand(16, 28, 28) * 255).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
        load_mnist(f)
    ok = _npz(tmp_path / "ok.npz", (np.random.rand(16, 28, 28) * 255).astype(np.uint8))
    train, _ = load_mnist(ok)
    assert train.images.dtype == torch.uint8 and train.images.shape == (16, 1, 28, 28)


def test_a_run_of_only_skipped_steps_stops(tmp_path):
    cfg = load_config("digits", [f"out_dir={tmp_path}", *TINY, "steps=300", "log_every=50"])
    with Trainer(cfg) as trainer:
        trainer.train_set.images[:] = float("nan")  # bypasses the loader's validation
        with pytest.raises(TrainingDiverged, match="100 consecutive"):
            trainer.run()
        assert trainer.step == 100


# 4-5. Checkpoints: no code execution, checksums ------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _framed(payload: bytes) -> bytes:
    return ckpt._header(hashlib.sha256(payload).hexdigest(), len(payload)) + payload


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_with_code_is_refused_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_framed(pickle.dumps({"config": {}, "model": _Evil(), "step": 0})))
    assert _main(["eval", "--checkpoint", str(evil)]) == 2
    _one_error_line(capsys, "evil.pt", "plain data")
    plain = tmp_path / "plain.pt"
    torch.save({"config": {}, "model": _Evil(), "step": 0}, plain)
    assert _main(["eval", "--checkpoint", str(plain)]) == 2
    _one_error_line(capsys, "not a dvae checkpoint")
    assert not (tmp_path / "pwned").exists()


def test_damaged_checkpoints_are_clear_errors(tmp_path, capsys):
    _train(tmp_path, "steps=2")
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    zeros = bytearray(good)
    zeros[len(good) // 2:len(good) // 2 + 4096] = bytes(4096)
    for damaged, needle in ((bytes(zeros), "checksum"), (good[: len(good) // 3], "truncated"),
                            (b"", "not a dvae checkpoint")):
        path.write_bytes(damaged)
        assert _main(["eval", "--checkpoint", str(path)]) == 2
        _one_error_line(capsys, str(path), needle)
        _train(tmp_path, "steps=4", "--resume", rc=2)
        _one_error_line(capsys, needle)


def test_disk_full_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"config": {}, "model": {}, "step": 1}, path)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.save_atomic({"config": {}, "model": {}, "step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# 6. Metrics -------------------------------------------------------------------------------------

def test_log_windows_average_only_the_steps_that_trained(tmp_path):
    cfg = load_config("digits", [f"out_dir={tmp_path}", *TINY, "steps=4", "log_every=4"])
    with Trainer(cfg) as trainer:
        real = trainer.step_fn._step
        calls = []

        def flaky(x, step):
            if step == 1:  # one step with a non-finite batch: skipped by the optimiser
                x = torch.full_like(x, float("nan"))
            m = real(x, step)
            calls.append(m["skipped"].item())
            return m

        trainer.step_fn._step = flaky
        res = trainer.run()
    assert calls == [0.0, 1.0, 0.0, 0.0]
    assert res["skipped_in_window"] == 1 and res["skipped"] == 1
    for key in ("loss", "log_px", "beta_elbo"):
        assert np.isfinite(res[key]), key


# 7. Signals and unwritable folders ----------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_and_saves(tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, "-m", "dvae.cli", "train", f"out_dir={tmp_path}",
                             *TINY, "steps=100000", "ckpt_every=100000", "log_every=1"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dvae: stopped by {sig.name} at step"), err
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert step >= 3 and ckpt.load(tmp_path / "checkpoint.pt")["step"] == step


def test_unwritable_out_dir_fails_before_any_step(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, needle in ((blocker, "not a folder"), (blocker / "sub", "not writable"),
                        ("/proc/dvae-run", "not writable")):
        t0 = time.perf_counter()
        _train(out, "steps=100000", rc=2)
        _one_error_line(capsys, str(out), needle)
        assert time.perf_counter() - t0 < 10


# 8-9. Every user mistake: one line, exit code 2, no traceback ------------------------------------

def _bad_inputs(tmp_path):
    run = tmp_path / "run"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1e-3\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    text = tmp_path / "x.txt"
    text.write_text("hello")
    broken = tmp_path / "broken"
    (broken / "val" / "a").mkdir(parents=True)
    (broken / "train" / "a").mkdir(parents=True)
    for i in range(3):
        (broken / "val" / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
        (broken / "train" / "a" / f"{i}.jpg").write_bytes(b"not a jpeg")
    ckpt_path = tmp_path / "ckpt.pt"
    ckpt_path.write_bytes(b"garbage")
    o = f"out_dir={run}"
    return [
        (["train", "--config", str(bad_yaml), o], "not valid YAML"),
        (["train", "--config", str(not_mapping), o], "mapping"),
        (["train", "--config", "nosuchpreset", o], "--config"),
        (["train", o, "device=gpu"], "device"),
        (["train", o, "log_every=0"], "log_every"),
        (["train", o, "grid_images=0"], "grid_images"),
        (["train", o, "kernel_backend=cuda"], "kernel_backend=cuda"),
        (["train", o, "kernel_backend=cuda", "device=cpu"], "kernel_backend=cuda"),
        (["train", o, "kernel_backend=fast"], "kernel_backend"),
        (["train", o, "preset=mnist"], "--config mnist"),
        (["train", o, "num_samples=1"], "num_samples"),
        (["train", o, "vocab_size=1"], "vocab_size"),
        (["train", o, "steps=0"], "steps"),
        (["train", o, "threads=many"], "threads"),
        (["train", o, "mlp_hidden=[1,"], "mlp_hidden"),
        (["train", o, "lr"], "key=value"),
        (["train", o, "no_such_key=1"], "no_such_key"),
        (["train", "--resum", o], "--resum"),
        (["train", "--resume", "--overwrite", o], "--overwrite"),
        (["frobnicate"], "frobnicate"),
        (["train", o, "--config", "mnist", f"data_path={png}"], str(png)),
        (["train", o, "--config", "mnist", f"data_path={text}"], str(text)),
        (["train", o, "--config", "mnist", f"data_path={tmp_path / 'missing.npz'}"],
         "missing.npz"),
        (["train", o, "--config", "imagenet256", f"data_path={broken}", "batch_size=2"],
         "no readable image"),
        (["eval", "--checkpoint", str(ckpt_path)], str(ckpt_path)),
        (["eval", "--checkpoint", str(tmp_path / "none.pt")], "does not exist"),
        (["reconstruct", "--checkpoint", str(ckpt_path), "--count", "0"], "--count"),
        (["reconstruct", "--checkpoint", str(ckpt_path), "--count", "two"], "--count"),
    ]


def test_every_user_mistake_is_one_line(tmp_path, capsys):
    for argv, needle in _bad_inputs(tmp_path):
        capsys.readouterr()
        assert _main(argv) == 2, argv
        _one_error_line(capsys, needle)


def test_kernel_backend_lacking_an_op_is_refused_before_any_work(monkeypatch):
    """An explicit backend that lacks an op the run would call is named at once: here the cuda
    backend on the logits path of a (pretended) GPU, which has no sampler."""
    from dvae.trainer import check_kernel_backend
    from dvae_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "backend_unavailable", lambda name, device: None)
    cfg = load_config("digits", ["kernel_backend=cuda", "fused_linear=never"])
    with pytest.raises(ValueError, match="kernel_backend=cuda has no implementation of .*"
                                         "sample_tokens"):
        check_kernel_backend(cfg, torch.device("cuda"))
    # the torch baseline samples with the encoder's own Gumbel-max: nothing lacking
    check_kernel_backend(load_config("digits", ["kernel_backend=torch"]), torch.device("cuda"))


def test_cli_error_through_the_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dvae.cli", "train", "device=gpu",
                           f"out_dir={tmp_path}"], capture_output=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        "dvae: error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"]


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(root / "ramp.png")  # mode I;16
    assert Image.open(root / "ramp.png").mode.startswith("I")
    ds = ImageFolderImages(tmp_path / "imgs", 32, train=False)
    x = ds.try_load(0)
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535)
    assert (x[0].double() - expected).abs().max() <= 1 / 255 + 1e-6
    assert x.mean().item() == pytest.approx(0.5, abs=0.02)


def test_unreadable_test_images_are_left_out_not_replaced(tmp_path):
    from PIL import Image

    from dvae.data import Preprocess
    from dvae.evaluate import evaluate
    from dvae.models import build_model

    val = tmp_path / "val" / "a"
    val.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.rand(8, 8, 3) * 255).astype(np.uint8)).save(val / f"{i}.png")
    (val / "3.png").write_bytes(b"broken")
    cfg = Config(dataset="imagenet256", image_size=8, channels=3, d_model=32, mlp_hidden=[32])
    ds = ImageFolderImages(tmp_path / "val", 8, train=False)
    model = build_model(cfg)
    with pytest.warns(UserWarning, match="unreadable"):
        res = evaluate(model, ds, Preprocess("gaussian", [0.5] * 3, [0.5] * 3), cfg,
                       torch.device("cpu"))
    assert res["eval_images"] == 3 and res["eval_unreadable"] == 1


# 10. Help ---------------------------------------------------------------------------------------

def test_train_help_lists_every_key(capsys):
    assert _main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(Config):
        line = next((s for s in out.splitlines() if s.strip().startswith(f"{f.name}=")), None)
        assert line is not None, f.name
        assert len(line.split(None, 1)) == 2, f"{f.name} has no meaning in --help"
    assert keys_help().count("\n") == len(dataclasses.fields(Config))


# 11. Ops edge cases -----------------------------------------------------------------------------

def test_ops_refuse_k0_and_d0_and_name_themselves():
    empty = torch.zeros(3, 0)
    with pytest.raises(ValueError, match="K >= 1"):
        dk.daps_weights(empty, empty, 0.5, 1.0)
    with pytest.raises(ValueError, match="K >= 1"):
        dk.solve_eta(empty, empty, 0.5, 0.3)
    tokens = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="D >= 1"):
        dk.linear_token_logprobs(torch.zeros(3, 0), torch.zeros(5, 0), tokens)
    with pytest.raises(ValueError, match="^linear_weighted_token_nll: weight must be"):
        dk.linear_weighted_token_nll(torch.zeros(3, 4), torch.zeros(5, 3), tokens,
                                     torch.ones(3))
    with pytest.raises(dk.BackendError, match="^linear_weighted_token_nll: backend 'cuda'"):
        dk.linear_weighted_token_nll(torch.zeros(3, 4), torch.zeros(5, 4), tokens,
                                     torch.ones(3), backend="cuda")
    # documented: an empty batch gives eta_max
    assert dk.solve_eta(torch.zeros(0, 4), torch.zeros(0, 4), 0.5, 0.3).item() == pytest.approx(1e12)

