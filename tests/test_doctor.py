"""``python -m coserve_jax.doctor``: the known-bad jax/flax table, the pins in pyproject.toml that
keep every Python away from those pairs, and the command's report and exit status."""

import json
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from coserve_jax import doctor

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "jax_v,flax_v,bad",
    [
        ("0.10.2", "0.12.8", False),
        ("0.11.0", "0.12.8", False),
        ("0.11.1", "0.12.8", True),
        ("0.11.2", "0.12.8", True),
        ("0.11.2", "0.12.0", True),
        ("0.11.1", "0.12.9", False),
        ("0.11.2", "0.12.9", True),
        ("0.11.2", "0.12.10", False),
        ("0.11.2", "0.13.1", False),
        ("0.11.2", "0.12.10.dev3", False),
    ],
)
def test_known_bad_pairs(jax_v, flax_v, bad):
    reason = doctor.check_pair(jax_v, flax_v)
    assert (reason is not None) == bad, reason
    if bad:
        assert "flax >= 0.12.10" in reason


def test_version_tuple():
    assert doctor._version_tuple("0.12.10.dev3") == (0, 12, 10)
    assert doctor._version_tuple("0.11.2rc1") == (0, 11, 2)
    assert doctor._version_tuple("1") == (1,)


def _flax_requirements() -> list[Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if r.name == "flax"]


@pytest.mark.parametrize("python,jax_versions", [("3.11", ["0.10.0", "0.10.2"]), ("3.12", ["0.11.0", "0.11.1", "0.11.2"]),
                                                 ("3.13", ["0.11.2"])])
def test_pins_admit_no_known_bad_pair(python, jax_versions):
    """For each Python, exactly one flax requirement applies, it admits some release, and none of
    the flax releases it admits is known bad with the jax that Python gets."""
    env = {"python_version": python, "python_full_version": python + ".0"}
    active = [r for r in _flax_requirements() if r.marker is None or r.marker.evaluate(env)]
    assert len(active) == 1, active
    releases = [f"0.12.{i}" for i in range(13)] + ["0.13.0", "0.13.2"]
    admitted = [v for v in releases if active[0].specifier.contains(v)]
    assert admitted, active[0]
    for jax_v in jax_versions:
        for flax_v in admitted:
            assert doctor.check_pair(jax_v, flax_v) is None, (python, jax_v, flax_v)


def test_pins_exclude_known_bad_releases_on_new_python():
    env = {"python_version": "3.12", "python_full_version": "3.12.3"}
    (req,) = [r for r in _flax_requirements() if r.marker.evaluate(env)]
    assert not req.specifier.contains("0.12.8") and not req.specifier.contains("0.12.9")
    assert req.specifier.contains("0.12.10")


def test_doctor_reports_this_environment():
    out = subprocess.run([sys.executable, "-m", "coserve_jax.doctor", "--json", "--lower"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["problems"] == []
    assert report["backend"] == "cpu" and report["devices"]
    assert report["attention_backend"] == "reference"
    assert report["kernel_lowering"] == ["__gpu$xla.gpu.triton"]
    assert report["packages"]["flax"] and report["packages"]["jax"]


def test_doctor_fails_on_a_known_bad_pair(monkeypatch, capsys):
    real = doctor._dist_version
    fake = {"jax": "0.11.2", "flax": "0.12.9"}
    monkeypatch.setattr(doctor, "_dist_version", lambda n: fake.get(n) or real(n))
    assert doctor.main([]) == 1
    text = capsys.readouterr().out
    assert "PROBLEM: jax 0.11.2 with flax 0.12.9" in text and "HiPrimitive" in text
