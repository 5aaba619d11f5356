"""The built wheel works on its own, as a user installing it from an index gets it.

The wheel is built from a copy of the sources (no build folder left in the checkout),
without build isolation and without an index, so nothing is downloaded (torch least
of all). It is installed with ``--no-deps`` into a fresh target folder, and the package
is then run from another directory by an interpreter started with ``-S``: its path holds
the target folder and the environment's site-packages (for the dependencies) but neither
the repository nor the editable install's import hook. From there the installed package
synthesizes a tiny cohort (NOT clinical data), trains ``experiment=demo debug=fdr`` with
the Hydra configs it carries, scores zero-shot findings with its bundled prompt set,
evaluates the checkpoint and serves it over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pretrain_helpers import COHORT_SHAPE, SHRINK

REPO = Path(__file__).resolve().parents[1]
# What a wheel is built from: everything pyproject.toml / setup.py read.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "volumevlm", "conf", "kernels")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    build_log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                      "-w", str(root / "dist"), str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("volumevlm-*.whl")
    target = root / "target"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)], cwd=root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VOLUMEVLM_CONF")}
    env["PYTHONIOENCODING"] = "utf-8"  # progress bars print box characters whatever the locale
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    work = root / "elsewhere"
    work.mkdir()
    return {"build_log": build_log, "wheel": wheel, "target": target, "env": env, "work": work}


def _volumevlm(installed: dict, *args: str, timeout: float = 300) -> str:
    # -S: no site-packages hooks (the editable install's finder, .pth files); the
    # dependencies come from PYTHONPATH like any other folder.
    return _run([sys.executable, "-S", "-m", "volumevlm.cli", *args], cwd=installed["work"], env=installed["env"], timeout=timeout)


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_carries_configs(installed):
    log = installed["build_log"]
    for warning in ("SetuptoolsDeprecationWarning", "BuildBackendWarning", "Package would be ignored", "is deprecated"):
        assert warning not in log, f"wheel build printed {warning!r}:\n{log[-4000:]}"
    package = installed["target"] / "volumevlm"
    assert (package / "conf" / "train.yaml").is_file()
    assert (package / "conf" / "debug" / "fdr.yaml").is_file()
    assert {p.stem for p in (package / "conf" / "prompts").glob("*.yaml")} >= {"synthetic", "merlin30", "ctrate18"}
    assert (package / "models" / "sizes" / "tiny.json").is_file()
    assert (package / "text" / "data" / "icd10_phecode.csv").is_file()
    assert (installed["target"] / "volumevlm_kernels").is_dir()
    assert not (installed["target"] / "kernels").exists()  # never a top-level `kernels` (transformers probes it)

    import volumevlm

    where = _run([sys.executable, "-S", "-c", "import volumevlm, volumevlm.resources as r; print(volumevlm.__file__); print(r.conf_dir())"],
                 cwd=installed["work"], env=installed["env"]).split()
    assert Path(where[0]).parent == package
    assert Path(where[1]) == package / "conf"
    assert _volumevlm(installed, "--version").strip() == f"volumevlm {volumevlm.__version__}"
    # The console script the wheel declares is there and runs.
    script = installed["target"] / "bin" / "volumevlm"
    assert script.is_file()
    out = _run([sys.executable, "-S", str(script), "--version"], cwd=installed["work"], env=installed["env"])
    assert out.strip() == f"volumevlm {volumevlm.__version__}"


@pytest.mark.slow
def test_installed_wheel_trains_and_scores_zero_shot(installed):
    work = installed["work"]
    shape = ",".join(map(str, COHORT_SHAPE))
    _volumevlm(installed, "synth", "--out", "cohort", "--n", "12", "--seed", "0", "--shape", shape, "--no-progress")
    shrink = [o for o in SHRINK if not o.startswith("~callbacks")]
    out = _volumevlm(installed, "train", "experiment=demo", "data.root=cohort", "output_dir=run", "debug=fdr", *shrink,
                     "~callbacks.rich_progress_bar")
    model_dir = work / "run" / "model"
    assert (model_dir / "model.safetensors").is_file(), out[-2000:]

    image = sorted((work / "cohort").rglob("*.nii.gz"))[0]
    _volumevlm(installed, "zero-shot", "-m", str(model_dir), "-i", str(image), "-o", "zero_shot.json")
    results = json.loads((work / "zero_shot.json").read_text())["results"]
    (probabilities,) = results.values()
    # No prompt file given: the checkpoint's set, else the bundled "synthetic" set, read
    # from the installed package.
    bundled = yaml.safe_load((installed["target"] / "volumevlm" / "conf" / "prompts" / "synthetic.yaml").read_text())
    assert list(probabilities) == list(bundled["findings"])
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())

    # Evaluation from the installed package: every protocol the checkpoint supports.
    _volumevlm(installed, "evaluate", "--checkpoint", str(model_dir), "--data", "cohort", "--out", "eval",
               "--split", "train,val,test", "--no-progress")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["n_cases"] == 12 and metrics["synthetic"]
    assert 0.0 <= metrics["zero_shot"]["macro_auroc"] <= 1.0
    assert metrics["zero_shot"]["prompt_set"] == "synthetic"

    # The HTTP service from the installed package answers what the command line answered.
    command = [sys.executable, "-S", "-m", "volumevlm.cli", "serve", "--checkpoint", str(model_dir), "--port", "0",
               "--log-level", "warning"]
    with open(work / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=work, env=installed["env"], stdout=subprocess.PIPE, stderr=log, text=True,
                                  encoding="utf-8")
        try:
            first = server.stdout.readline()
            assert first.startswith("volumevlm serve: http://127.0.0.1:"), first + (work / "server.log").read_text()
            url = first.split()[2]
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert httpx.get(url + "/healthz").status_code == 200
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, (work / "server.log").read_text()
                    time.sleep(0.1)
            answer = httpx.post(url + "/v1/zero-shot", files={"file": (image.name, image.read_bytes())}, timeout=60)
            assert answer.status_code == 200, answer.text
            served = answer.json()["probabilities"]
            assert list(served) == list(probabilities)
            assert max(abs(served[k] - probabilities[k]) for k in served) < 1e-5
            server.send_signal(signal.SIGINT)
            assert server.wait(30) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
