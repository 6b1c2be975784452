"""The set-up files agree with each other: pyproject.toml declares the dependencies, requirements.lock pins them
(what `make` installs), environment.yml lists them for conda users; the test-only packages stay out of
`import kdiv`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from the PyPI names in pyproject.toml
CONDA_TO_PYPI = {"pytorch": "torch", "pot": "POT"}
TEST_ONLY = {"scipy": "scipy", "POT": "ot", "hypothesis": "hypothesis"}  # distribution -> import name


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def declared():
    """Requirement objects of pyproject.toml: (runtime, every extra's)."""
    project = _pyproject()["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    extras = [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    return runtime, extras


def lock_pins():
    """canonical name -> pinned Version, from requirements.lock; every requirement line must be `name==version`."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
        assert match, f"requirements.lock line is not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice in requirements.lock"
        pins[name] = Version(match[2])
    return pins


def environment_yml():
    """(conda package names, pip entries) of environment.yml, read without a YAML library: its layout is fixed,
    a `dependencies:` list of `- name[=version]` lines with one final `- pip:` list."""
    conda, pip, section = [], [], None
    lines = [
        ln
        for ln in (ROOT / "environment.yml").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    for line in lines:
        stripped = line.strip()
        if not line.startswith(" "):
            section = stripped.rstrip(":") if stripped.endswith(":") else None
            continue
        if section != "dependencies":
            continue
        indent = len(line) - len(line.lstrip())
        item = stripped.removeprefix("- ").strip()
        if item == "pip:":
            pip = []
            pip_indent = indent
            conda.append("pip:")
        elif conda and conda[-1] == "pip:" and indent > pip_indent:
            pip.append(item)
        else:
            assert not (conda and conda[-1] == "pip:"), f"environment.yml: {item!r} after the pip: list"
            conda.append(re.split(r"[=<>! ]", item, maxsplit=1)[0])
    return conda, pip


def test_environment_yml_lists_exactly_the_declared_dependencies():
    runtime, dev = declared()
    want = {canonicalize_name(r.name) for r in runtime + dev}
    conda, pip = environment_yml()
    assert conda[-1] == "pip:", "environment.yml must end with a pip: list"
    packages = [c for c in conda[:-1] if c not in ("python", "pip")]
    assert "python" in conda and "pip" in conda[:-1]
    got = [canonicalize_name(CONDA_TO_PYPI.get(c.lower(), c)) for c in packages]
    assert len(got) == len(set(got)), f"listed twice in environment.yml: {sorted(got)}"
    assert set(got) == want, (
        f"missing from environment.yml: {sorted(want - set(got))}; not in pyproject.toml: {sorted(set(got) - want)}"
    )
    assert pip == ["-e ."]


def test_environment_yml_pins_the_locked_torch():
    text = (ROOT / "environment.yml").read_text()
    match = re.search(r"^\s*-\s*pytorch\s*=+\s*([0-9][^\s]*)\s*$", text, flags=re.MULTILINE)
    assert match, "environment.yml should pin pytorch"
    assert Version(match[1]) == lock_pins()["torch"]


def test_lock_pins_torch_and_every_declared_dependency():
    pins = lock_pins()
    assert pins["torch"] == Version("2.13.0")
    runtime, dev = declared()
    for req in runtime + dev:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_pyproject_layout():
    project = _pyproject()
    assert project["project"]["name"] == "kdiv"
    assert project["tool"]["setuptools"]["packages"]["find"]["where"] == ["lib"]
    # the native backend compiles its C++ source at run time: it must ship with the package
    sources = project["tool"]["setuptools"]["package-data"]["kdiv.core.engine"]
    assert [p.name for p in (ROOT / "lib/kdiv/core/engine").glob("*.cpp")] == ["fused_rows.cpp"]
    assert "*.cpp" in sources
    for dist in TEST_ONLY:
        runtime, dev = declared()
        assert dist.lower() not in {r.name.lower() for r in runtime}, f"{dist} is test-only: keep it in dev"
        assert dist.lower() in {r.name.lower() for r in dev}


def test_core_needs_torch_and_numpy_only():
    # A fresh interpreter in which every installed distribution but torch, numpy and what torch itself requires
    # cannot be imported: `import kdiv` and every token-level divergence (values and gradients) and transport
    # function must work there, as after `pip install kdiv` in a venv with torch and numpy alone.
    code = """
import importlib.abc, importlib.metadata as md, sys
from packaging.requirements import Requirement

def needs(dist, seen):
    if dist in seen:
        return seen
    seen.add(dist)
    for r in md.requires(dist) or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            try:
                needs(md.distribution(req.name).metadata["Name"].lower(), seen)
            except md.PackageNotFoundError:
                pass
    return seen

allowed = needs("torch", set()) | needs("numpy", set())
blocked = {top for top, dists in md.packages_distributions().items()
           if not any(d.lower() in allowed for d in dists) and top != "kdiv"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked: {name}")

# torch's compiler probes optional packages with find_spec (it imports none of them): let it do so first
import torch._dynamo
for name in list(sys.modules):
    if name.split(".")[0] in blocked:
        del sys.modules[name]
sys.meta_path.insert(0, Block())
import torch, kdiv
s = torch.randn(4, 3, 50, requires_grad=True); t = torch.randn(4, 3, 50)
for name in kdiv.DIVERGENCES:
    kdiv.get(name)(s, t).backward()
kdiv.sinkd(s.detach()[0], t[0]); kdiv.wasserstein_1d(s.detach(), t)
assert torch.isfinite(s.grad).all()
print(len(blocked), sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in blocked))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    n_blocked, leaked = out.stdout.split(" ", 1)
    assert int(n_blocked) > 10 and leaked.strip() == "[]"


def test_import_does_not_pull_test_only_packages():
    # One fresh interpreter (this session has imported scipy and hypothesis already) imports kdiv and then every
    # submodule, and reports which test-only packages each one brought in.
    code = f"""
import importlib, pkgutil, sys
test_only = {sorted(TEST_ONLY.values())!r}
import kdiv
names = ["kdiv"] + [m.name for m in pkgutil.walk_packages(kdiv.__path__, "kdiv.")]
seen = set()
for name in names:
    importlib.import_module(name)
    new = [m for m in test_only if m in sys.modules and m not in seen]
    seen.update(new)
    print(name, *new)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = [line.split() for line in out.stdout.splitlines()]
    assert report and report[0][0] == "kdiv" and len(report) > 15
    offenders = {line[0]: line[1:] for line in report if len(line) > 1}
    assert not offenders, f"importing these modules loads test-only packages: {offenders}"


def test_version_has_one_source():
    import importlib.metadata

    import kdiv

    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("kdiv") == kdiv.__version__


def test_an_editable_install_is_the_source_tree():
    import importlib.metadata
    import json

    import kdiv

    direct_url = importlib.metadata.distribution("kdiv").read_text("direct_url.json")
    if not direct_url or not json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("kdiv is installed from a wheel, not editable: its files are not the source tree")
    assert Path(kdiv.__file__).resolve().parent == ROOT / "lib" / "kdiv"
