"""A non-editable install runs the workflow: `pip install` of a wheel into a fresh venv, then Snakemake from
another folder, with a deployment copy of the workflow files that holds no llavaflow source at all."""

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


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
