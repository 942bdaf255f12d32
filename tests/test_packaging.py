"""The built wheel is the whole package: installed apart from the source tree, every subpackage
imports and the server's command line answers ``--help``."""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import shutil
import site
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pathlib, pkgutil, sys
import coserve_jax
where = pathlib.Path(coserve_jax.__file__).resolve()
assert str(where).startswith(sys.argv[1]), f"imported from {where}, not the installed wheel"
names = sorted(m.name for m in pkgutil.walk_packages(coserve_jax.__path__, "coserve_jax.") if m.ispkg)
for name in names:
    importlib.import_module(name)
expected = sorted(p.parent.relative_to(sys.argv[2]).as_posix().replace("/", ".")
                  for p in pathlib.Path(sys.argv[2], "coserve_jax").rglob("__init__.py"))
assert names == [n for n in expected if n != "coserve_jax"], (names, expected)
print(len(names), "subpackages")
"""


def test_wheel_installs_apart_from_the_source_and_imports_every_subpackage(tmp_path):
    # Built from a copy of what a clean checkout holds (a stale build/ directory would hide a
    # package missing from the project's package list).
    src = tmp_path / "src"
    shutil.copytree(ROOT / "coserve_jax", src / "coserve_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        build.insert(4, "--no-build-isolation")  # (no download of the build backend)
    subprocess.run(build, check=True, cwd=tmp_path)
    [wheel] = glob.glob(str(tmp_path / "dist" / "coserve_jax-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), wheel], check=True)
    # python -S: no site-packages processing, so the editable install's finder (.pth) cannot
    # serve the source tree; the dependencies are reached through PYTHONPATH, after the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-S", "-c", CHECK, str(target.resolve()), str(ROOT)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "subpackages" in out.stdout
    help_out = subprocess.run([sys.executable, "-S", "-m", "coserve_jax.serve", "--help"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert help_out.returncode == 0, help_out.stderr[-3000:]
    assert "usage" in help_out.stdout.lower()
