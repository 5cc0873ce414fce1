"""Installing llavaflow.

- install.sh's choices (which environment, whether torch is installed first), run against a stand-in python
  that logs what it is asked to do;
- a non-editable install runs the workflow: `pip install` of a wheel into a fresh venv, then Snakemake from
  another folder, with a deployment copy of the workflow files that holds no llavaflow source at all.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, run

# Stands in for an environment's python: logs each call; has torch only when STUB_TORCH names a version.
STUB_PYTHON = r"""#!/bin/bash
echo "$0 $*" >> "$STUB_LOG"
case "$*" in
    "-c import torch") [[ -n "${STUB_TORCH:-}" ]] ;;
    *"print(torch.__version__)"*) echo "$STUB_TORCH" ;;
    "-m venv .venv") mkdir -p .venv/bin && cp "$0" .venv/bin/python ;;
    *"print(sys.executable)"*) echo "$0" ;;
esac
"""


def _install_sh(tmp_path, **env):
    """Run a copy of install.sh with the stand-in as `python` and `python3`; returns (stdout, logged calls)."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir()
    bin_dir.mkdir()
    shutil.copy(ROOT / "install.sh", repo / "install.sh")
    for name in ("python", "python3"):
        (bin_dir / name).write_text(STUB_PYTHON)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    proc = subprocess.run(["bash", str(repo / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), **env})
    assert proc.returncode == 0, proc.stderr
    calls = [line.replace(str(bin_dir), "<bin>").replace(str(repo), "<repo>") for line in log.read_text().splitlines()]
    return proc.stdout, calls


def test_install_sh_keeps_the_torch_of_the_active_env(tmp_path):
    stdout, calls = _install_sh(tmp_path, VIRTUAL_ENV=str(tmp_path / "env"), STUB_TORCH="2.11.0+cu130")
    assert calls == ["<bin>/python -c import torch", "<bin>/python -c import torch; print(torch.__version__)",
                     "<bin>/python -m pip install --quiet -e .[test]", "<bin>/python -c import sys; print(sys.executable)"]
    assert "install.sh: keeping torch 2.11.0+cu130" in stdout


def test_install_sh_installs_torch_first_where_there_is_none(tmp_path):
    _, calls = _install_sh(tmp_path, CONDA_PREFIX=str(tmp_path / "conda"))
    assert calls[1:3] == ["<bin>/python -m pip install --quiet torch==2.13.0", "<bin>/python -m pip install --quiet -e .[test]"]


def test_install_sh_takes_torch_from_torch_index_url_when_set(tmp_path):
    _, calls = _install_sh(tmp_path, CONDA_PREFIX=str(tmp_path / "conda"), TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu")
    assert calls[1] == "<bin>/python -m pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_install_sh_without_an_active_env_makes_and_uses_dot_venv(tmp_path):
    stdout, calls = _install_sh(tmp_path)
    assert calls[0] == "<bin>/python3 -m venv .venv"
    assert all(c.startswith(".venv/bin/python ") for c in calls[1:]) and len(calls) == 5, calls
    assert (tmp_path / "repo" / ".venv" / "bin" / "python").is_file()
    assert stdout.strip().endswith("installed for .venv/bin/python")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv with llavaflow installed from a wheel; its dependencies are this environment's (a .pth line), so
    nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so that setuptools' build/ folder is not left in the checkout
    shutil.copytree(ROOT / "workflow" / "llavaflow", src / "workflow" / "llavaflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("llavaflow-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)])
    return venv


@pytest.mark.slow
def test_wheel_ships_the_schema_and_runs_the_tiny_dag_from_another_folder(venv, tmp_path):
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    where = run([str(python), "-c", "import llavaflow.config as c; print(c.__file__, c.SCHEMA.is_file())"]).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == "True"

    deploy = tmp_path / "deploy"  # the workflow files without the library
    deploy.mkdir()
    for name in ("Snakefile", "rules", "config", "envs", "profiles"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, deploy / name)
    shutil.copytree(ROOT / "workflow" / "report", deploy / "workflow" / "report")
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": ""}
    options = ["--cores", "1", "--snakefile", str(deploy / "Snakefile"), "--directory", str(work),
               "--configfile", str(deploy / "config" / "tiny.yaml")]  # after the targets: --configfile takes several
    dag = run([str(python), "-m", "snakemake", "all", "--d3dag", *options], cwd=work, env=env).stdout
    assert '"rule": "report"' in dag
    run([str(python), "-m", "snakemake", "results/tiny", *options], cwd=work, env=env, timeout=600)
    assert (work / "results" / "tiny" / "llm" / "config.json").is_file()
    assert (work / "results" / "mmbench" / "data" / "CCBench.tsv").is_file()
