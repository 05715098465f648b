"""The package as a user installs it: a wheel in a fresh virtual environment, run from a directory
that is not the source tree, finds the embedded default inside itself (the synthetic world, its
tiny backbones, the shipped configs by name).

Offline: the wheel is built without build isolation, installed with --no-index, and the fresh
environment sees this one's packages (torch, transformers, ...) through a path file.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "qformer_cli", "sample_data", "configs")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path  # the fresh environment's own
    workdir: Path  # an unrelated directory: no sample_data/ or configs/ in it

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """``qformer ARGS`` (or ``python ARGS`` when args[0] is "python") in ``workdir``."""
        program = "python" if args[0] == "python" else "qformer"
        command = [str(self.venv / "bin" / program), *args[program == "python" :]]
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QFORMER_SAMPLE_DATA")
        }
        env["OMP_NUM_THREADS"] = "1"
        return subprocess.run(
            command, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )

    def json_of(self, *args: str) -> dict:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)


def _checked(command: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return result.stdout


def _build_wheel(base: Path) -> Path:
    # Built from a copy: building in the checkout would leave build/ and *.egg-info there.
    source = base / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(source), "-q", "-w", str(base / "dist")]
    _checked([*pip_wheel, "--no-deps", "--no-build-isolation", "--no-index"])
    (wheel,) = (base / "dist").glob("qformer_cli-*.whl")
    return wheel


def _fresh_venv(venv: Path) -> Path:
    _checked([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    purelib = Path(
        _checked([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    )
    # This environment's site-packages go on the fresh one's path after its own. Listed as plain
    # directories, so their .pth files (an editable install of the checkout among them) do not run.
    (purelib / "outer_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return purelib


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(base)
    venv = base / "venv"
    site_packages = _fresh_venv(venv)
    install = ["-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    _checked([str(venv / "bin" / "python"), *install])
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(venv, site_packages, workdir)


def _relative_files(folder: Path) -> set[str]:
    return {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_installed_package_is_imported_and_holds_everything(installed: Installed):
    where = installed.run(
        "python",
        "-c",
        "import qformer_cli, qformer_cli.embedded as e;"
        "print(qformer_cli.__file__); print(e.sample_data_dir()); print(e.configs_dir())",
    )
    assert where.returncode == 0, where.stderr
    package_file, sample_data, configs = map(Path, where.stdout.split())
    package = installed.site_packages / "qformer_cli"
    assert package_file == package / "__init__.py"
    assert sample_data == package / "_embedded" / "sample_data"
    assert configs == package / "_embedded" / "configs"
    modules = {name for name in _relative_files(package) if not name.startswith("_embedded/")}
    assert modules == _relative_files(ROOT / "qformer_cli")  # pyproject.toml lists every package
    assert _relative_files(sample_data) == _relative_files(ROOT / "sample_data")
    assert _relative_files(configs) == {p.name for p in (ROOT / "configs").glob("*.yaml")}


def test_info_on_the_default_and_a_shipped_config_by_name(installed: Installed):
    default = installed.json_of("info")
    assert (default["preset"], default["vision_model"]) == ("tiny", "sample_data/backbones/vision")
    paper = installed.json_of("info", "--config", "blip2_vitg_opt2.7b")
    assert paper["parameters"]["qformer_encoder"]["parameters"] == 105_137_664


def test_train_both_stages_and_caption_from_anywhere(installed: Installed):
    tiny = ["--max-steps", "2", "--batch-size", "4", "--set", "model.qformer.num_layers=2"]
    stage1 = installed.json_of("pretrain-stage1", *tiny, "--out", "s1")
    assert (installed.workdir / stage1["final_checkpoint"]).is_dir()
    stage2 = installed.json_of("pretrain-stage2", *tiny, "--init", "s1", "--out", "s2")
    final = installed.workdir / stage2["final_checkpoint"]
    recorded = json.loads((final / "config.json").read_text())["run"]
    # No --config is configs/tiny.yaml, VQA pairs included, read from the installed copy.
    assert recorded["data"]["vqa_questions"] == "sample_data/vqa_train_questions.json"
    image = installed.workdir / "photo.png"
    shutil.copy(ROOT / "sample_data" / "images" / "val" / "scene_200000.png", image)
    captions = installed.json_of(
        "caption", "--model", "s2", "--images", str(image), "--num-beams", "1",
        "--max-new-tokens", "4", "--min-new-tokens", "1", "--out", "captions",
    )  # fmt: skip
    assert captions["num_images"] == 1
    (written,) = json.loads((installed.workdir / captions["captions"]).read_text())
    assert written["caption"].strip()
