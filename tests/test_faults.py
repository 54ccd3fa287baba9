"""Kill -9 at random moments (saves included), resume, repeat: the finished run must be
bit-identical to an uninterrupted one, with every logged step once and no temporary files
left behind (docs/conventions.md#runs)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from utils import assert_bitwise_equal

from dvae.checkpoint import load

STEPS = 40
ARGS = ["progress=false", "tensorboard=false", f"steps={STEPS}", "batch_size=16",
        "num_samples=4", "d_model=32", "mlp_hidden=[32]", "log_every=2", "ckpt_every=1",
        "eval_every=0", "eval_samples=16"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dvae.cli", "train", f"out_dir={out}", *ARGS, *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + \
        env.get("PYTHONPATH", "")
    return env


def _checkpoint_step(path: Path) -> int:
    try:
        return int(load(path)["step"])
    except ValueError:
        return -1


def test_sigkill_anywhere_then_resume_is_exact(tmp_path):
    rng = random.Random(1234)
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight), check=True, env=_env(), capture_output=True, timeout=300)

    out = tmp_path / "killed"
    kills = 0
    first = True
    for _ in range(8):
        proc = subprocess.Popen(_cmd(out, *([] if first else ["--resume"])), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = False
        start = _checkpoint_step(out / "checkpoint.pt")
        # wait until the process is training (a checkpoint past where it started), then
        # kill it a random moment later: during a step, a log write or a save
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if _checkpoint_step(out / "checkpoint.pt") > start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
    else:
        subprocess.run(_cmd(out, "--resume"), check=True, env=_env(), capture_output=True,
                       timeout=300)
    assert kills >= 2, "the run finished before it could be killed twice"

    a, b = load(straight / "checkpoint.pt"), load(out / "checkpoint.pt")
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "optimizer", "eta_optimizer", "generators", "rng_cpu"):
        assert_bitwise_equal(a[part], b[part], part)

    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(2, STEPS + 1, 2)), steps
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

