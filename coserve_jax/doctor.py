"""``python -m coserve_jax.doctor``: what this environment runs and whether it can run coserve-jax.

Prints Python, jax, jaxlib, the CUDA plugin, flax, optax, orbax-checkpoint and (optional)
jax-triton versions, JAX's backend and devices, and which attention backend
``attention_impl="auto"`` will use. With ``--lower`` it also lowers the Pallas paged-attention
kernel for CUDA (works on a CPU-only machine too: jaxlib ships the Triton bindings) and reports the
custom call it became. Exit status 1 when a check fails: a jax/flax pair known not to import
together, a package that does not import, or (with ``--lower``) a kernel that does not lower to
one Pallas Triton call. ``--json`` prints the report as one JSON object instead of text.

Known-bad pairs (:data:`KNOWN_BAD`) come from importing each flax release on each jax release:
flax <= 0.12.8 uses ``MutableHiType`` / ``AvalQDD`` (removed in jax 0.11.1) and flax 0.12.9 uses
``HiPrimitive`` (renamed ``HiPrim`` in jax 0.11.2), so flax 0.12.10 is the first that imports
on jax 0.11.2; on Python 3.11 (jax <= 0.10.x) flax <= 0.12.8 is what installs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import platform
import sys


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.12.10.dev3"`` -> ``(0, 12, 10)``: the leading numeric release fields."""
    out = []
    for part in version.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class BadPair:
    """A flax range that does not import on a jax range (both bounds inclusive, release tuples)."""

    flax_min: tuple[int, ...]
    flax_max: tuple[int, ...]
    jax_min: tuple[int, ...]
    reason: str

    def matches(self, jax_version: str, flax_version: str) -> bool:
        """Whether the installed pair falls in this range."""
        f, j = _version_tuple(flax_version), _version_tuple(jax_version)
        return self.flax_min <= f <= self.flax_max and j >= self.jax_min


KNOWN_BAD: tuple[BadPair, ...] = (
    BadPair((0,), (0, 12, 8), (0, 11, 1),
            "flax <= 0.12.8 uses jax's MutableHiType/AvalQDD, removed in jax 0.11.1: install flax >= 0.12.10"),
    BadPair((0, 12, 9), (0, 12, 9), (0, 11, 2),
            "flax 0.12.9 uses jax's HiPrimitive, renamed HiPrim in jax 0.11.2: install flax >= 0.12.10"),
)


def check_pair(jax_version: str, flax_version: str) -> str | None:
    """The reason a jax/flax pair is known not to work together, or ``None``.

    Args:
        jax_version, flax_version: version strings as ``importlib.metadata.version`` gives them.
    """
    for bad in KNOWN_BAD:
        if bad.matches(jax_version, flax_version):
            return f"jax {jax_version} with flax {flax_version}: {bad.reason}"
    return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


CUDA_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt")


def lower_kernel_for_cuda() -> list[str]:
    """Lower the paged-attention kernel for CUDA at a small shape (4 query heads, 2 KV heads, D 64,
    bf16, page 16) and return the custom-call targets of the lowered module (one
    ``__gpu$xla.gpu.triton`` when Pallas Triton takes it).

    Raises:
        Exception: whatever the lowering raises (e.g. Mosaic GPU's shared-memory check).
    """
    import re

    import jax
    import jax.numpy as jnp

    from coserve_jax.kernels.ragged_paged_attention import ragged_paged_attention

    sds = jax.ShapeDtypeStruct
    cache = sds((2, 64, 16, 2, 64), jnp.bfloat16)
    args = (sds((32, 4, 64), jnp.bfloat16), cache, cache, sds((), jnp.int32), sds((4,), jnp.int32),
            sds((4, 16), jnp.int32), sds((5,), jnp.int32), sds((), jnp.int32))
    text = ragged_paged_attention.trace(*args, scale=0.125).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text)


def diagnose(lower: bool = False) -> dict:
    """Collect the report (see the module docstring).

    Returns:
        ``{"python", "packages": {name: version or None}, "backend", "devices": [...],
        "attention_backend", "problems": [str], "kernel_lowering" (with ``lower``)}``; an empty
        ``problems`` list means every check passed.
    """
    report: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "problems": []}
    problems: list[str] = report["problems"]
    names = ("jax", "jaxlib", *CUDA_PLUGINS, "flax", "optax", "orbax-checkpoint", "jax-triton", "transformers", "tokenizers")
    report["packages"] = {n: _dist_version(n) for n in names}
    pk = report["packages"]
    for required in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        if pk[required] is None:
            problems.append(f"{required} is not installed")
    if pk["jax"] and pk["jaxlib"] and _version_tuple(pk["jax"])[:3] != _version_tuple(pk["jaxlib"])[:3]:
        # jax accepts some older jaxlibs, but a mismatch is the first thing to suspect.
        report["note"] = f"jax {pk['jax']} with jaxlib {pk['jaxlib']}"
    if pk["jax"] and pk["flax"]:
        bad = check_pair(pk["jax"], pk["flax"])
        if bad:
            problems.append(bad)
    try:
        import jax

        report["backend"] = jax.default_backend()
        report["devices"] = [
            {"id": d.id, "platform": d.platform, "kind": getattr(d, "device_kind", "?"), "process": d.process_index}
            for d in jax.devices()
        ]
    except Exception as exc:  # a broken plugin, no devices: report it, do not crash
        problems.append(f"jax does not start: {type(exc).__name__}: {exc}")
        report["backend"] = None
        report["devices"] = []
    for module in ("flax.nnx", "optax", "orbax.checkpoint"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(f"import {module} fails: {type(exc).__name__}: {exc}")
    if report["backend"]:
        from coserve_jax.kernels.paged_attention import default_implementation

        report["attention_backend"] = default_implementation(report["backend"])
    if lower:
        try:
            targets = lower_kernel_for_cuda()
            report["kernel_lowering"] = targets
            if targets != ["__gpu$xla.gpu.triton"]:
                problems.append(f"the paged-attention kernel lowered for CUDA to {targets}, not one Pallas Triton call")
        except Exception as exc:
            report["kernel_lowering"] = None
            problems.append(f"the paged-attention kernel does not lower for CUDA: {type(exc).__name__}: {str(exc)[:300]}")
    return report


def _print_text(report: dict) -> None:
    print(f"python            {report['python']} ({report['platform']})")
    for name, version in report["packages"].items():
        if version is not None or name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
            print(f"{name:17s} {version or 'not installed'}")
    if "note" in report:
        print(f"note              {report['note']}")
    print(f"backend           {report.get('backend')}")
    for d in report.get("devices", []):
        print(f"  device {d['id']}: {d['platform']} {d['kind']} (process {d['process']})")
    if "attention_backend" in report:
        how = "Pallas Triton kernel" if report["attention_backend"] == "pallas" else "pure-JAX reference (gathers live pages)"
        print(f"attention (auto)  {report['attention_backend']}: {how}")
    if "kernel_lowering" in report:
        print(f"kernel for cuda   {report['kernel_lowering']}")
    if report["problems"]:
        for p in report["problems"]:
            print(f"PROBLEM: {p}")
    else:
        print("ok")


def main(argv: list[str] | None = None) -> int:
    """Run the checks and print them; returns the exit status (0 ok, 1 a problem)."""
    parser = argparse.ArgumentParser(prog="python -m coserve_jax.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lower", action="store_true", help="also lower the Pallas kernel for CUDA (a few seconds)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = diagnose(lower=args.lower)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
