"""The wheel a user installs: built once, installed (not editable) in a clean venv, then used.

The module builds the sdist and the wheel with ``python -m build`` (the wheel from the sdist,
as a release does, so a file the sdist forgets is missing here too), installs the wheel with
its ``integrations`` extra into a fresh venv through ``constraints.txt`` (torch 2.13.0, the
local CPU wheel), and checks what a user would see: ``twine check``, the archive's files,
``pip show`` / ``pip inspect`` metadata, and the README's quick-start snippets run from that
venv. The snippets are read from README.md here, never copied, so the two cannot drift apart.

Everything heavy happens once per module (fixtures of module scope) in pytest's tmp dirs; on
2 cores the module takes about half a minute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONSTRAINTS = ROOT / "constraints.txt"
MAKEFILE = ROOT / "Makefile"
QUICK_START = "## Quick start"
# Each subprocess gets a ceiling so a hung pip or build fails the test instead of the CI job.
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced ``python`` block: its code and the README line its first code line is on."""

    line: int
    code: str


def quick_start_blocks(text: str) -> list[Block]:
    """The ``python`` blocks of README's quick-start section, in order.

    The section runs from the ``## Quick start`` heading to the next ``## `` heading. Blocks
    with another info string (``bash``, plain output) are not code to run.
    """
    lines = text.splitlines()
    if QUICK_START not in lines:
        raise ValueError(f"README.md has no {QUICK_START!r} heading")
    start = lines.index(QUICK_START)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks: list[Block] = []
    i = start + 1
    while i < end:
        fence = lines[i].strip()
        if fence.startswith("```"):
            close = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if fence == "```python":
                blocks.append(Block(i + 2, "\n".join(lines[i + 1 : close])))
            i = close
        i += 1
    return blocks


# The names the quick start leaves to the reader ("with your own model", "your data"): the
# smallest objects of the kind the README describes, defined before its first block. Nothing
# here defines a name the README's blocks assign themselves (checked below), so the README's
# own code is what runs. 200 batches: the probe of the third block measures every 50 steps
# and a fit needs 3 points per role.
READER_CONTEXT = '''
import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainingArguments

args = TrainingArguments(output_dir="trainer-out", report_to=[], use_cpu=True)
data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}]


class MyGPT(nn.Module):
    """Embedding inputs, one hidden matrix, a norm and an lm_head, as the README asks."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln(torch.relu(self.fc(self.wte(x)))))


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


_gen = torch.Generator().manual_seed(0)
loader = [
    (torch.randint(0, 64, (4, 8), generator=_gen), torch.randint(0, 64, (4, 8), generator=_gen))
    for _ in range(200)
]
'''
READER_NAMES = ("args", "data", "MyGPT", "loss_fn", "loader")

# Runs in the clean venv: the reader's context, then every block in one namespace (the blocks
# continue each other: the third uses the second's model and loop variables), each compiled
# under README.md's own path and line numbers so a traceback shows the README line that failed.
RUNNER = """
import json, sys
spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__main__"}
exec(compile(spec["context"], "<reader context>", "exec"), namespace)
for block in spec["blocks"]:
    source = "\\n" * (block["line"] - 1) + block["code"]
    exec(compile(source, spec["readme"], "exec"), namespace)
    print(f"quick-start block at README.md:{block['line']}: ok", flush=True)
import gluon_optim
print("gluon_optim imported from", gluon_optim.__file__, flush=True)
"""


def _pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, **kwargs
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built once (the wheel from the sdist) into a tmp dir."""
    out = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)]))
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def clean_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel with its ``integrations`` extra; its interpreter."""
    env_dir = tmp_path_factory.mktemp("clean-venv")
    # No pip inside: this session's pip installs into it through --python, which saves
    # bootstrapping one. No system site-packages: only what the wheel's metadata pulls in.
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    # The wheel's own dependency metadata resolves (no --no-deps); constraints.txt pins
    # torch to the local CPU wheel. --no-compile: byte-compiling torch is most of the time.
    _ok(_pip(python, "install", "--no-compile", "-c", str(CONSTRAINTS), f"{wheel}[integrations]"))
    return python


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "pip", "--python", str(python), *args])


def test_quick_start_blocks_are_found_and_compile() -> None:
    blocks = quick_start_blocks(README.read_text(encoding="utf-8"))
    assert blocks, f"no python blocks under {QUICK_START!r} in README.md"
    for block in blocks:
        compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    code = "\n".join(b.code for b in blocks)
    for name in READER_NAMES:
        # The context supplies only what the README uses and leaves to the reader.
        assert re.search(rf"\b{name}\b", code), f"the quick start no longer uses {name!r}"
        assert not re.search(rf"^\s*{name}\s*=|^\s*(class|def)\s+{name}\b", code, re.M), (
            f"the quick start defines {name!r} itself; drop it from READER_CONTEXT"
        )


def test_twine_check_passes(dist: Path) -> None:
    files = sorted(str(p) for p in dist.iterdir())
    assert len(files) == 2, files  # the sdist and the wheel
    out = _ok(_run([sys.executable, "-m", "twine", "check", "--strict", *files]))
    assert out.count("PASSED") == 2, out


def test_wheel_holds_the_package_with_py_typed_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "gluon_optim/py.typed" in names
    assert not [n for n in names if re.search(r"(^|/)(tests?|conftest\.py|test_[^/]*\.py)($|/)", n)]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"gluon_optim"}, top
    # Every module of the source tree ships: a subpackage without __init__.py would be
    # dropped by package discovery without an error.
    src = ROOT / "src"
    expected = {
        p.relative_to(src).as_posix() for p in src.rglob("*.py") if "__pycache__" not in p.parts
    }
    assert expected == {n for n in names if n.endswith(".py")}


def test_pip_sees_the_metadata_of_pyproject(clean_python: Path) -> None:
    project = _pyproject()
    show = dict(
        line.split(": ", 1)
        for line in _ok(_pip(clean_python, "show", "gluon-optim")).splitlines()
        if ": " in line
    )
    assert show["Version"] == project["version"]
    assert "torch" in [r.strip() for r in show["Requires"].split(",")]
    # pip show prints neither Requires-Python nor the version ranges; pip inspect has both.
    report = json.loads(_ok(_pip(clean_python, "inspect")))
    installed = {d["metadata"]["name"]: d for d in report["installed"]}
    ours = installed["gluon-optim"]
    assert ours["metadata"]["requires_python"] == project["requires-python"]
    torch_req = [r for r in project["dependencies"] if r.startswith("torch")]
    # The floor users are told is the oldest torch `make test-compat` runs (the Makefile's).
    oldest = re.search(r"^OLDEST_TORCH := (\d+\.\d+)\.\d+$", MAKEFILE.read_text(), re.M)
    assert oldest is not None, "the Makefile names no OLDEST_TORCH"
    assert torch_req == [f"torch>={oldest.group(1)}"]
    assert torch_req[0] in ours["metadata"]["requires_dist"]
    # Installed from the wheel file, not editable, and torch resolved to the pinned wheel.
    assert "archive_info" in ours["direct_url"], ours["direct_url"]
    assert installed["torch"]["metadata"]["version"].startswith("2.13.0")


def test_readme_quick_start_runs_from_the_wheel(clean_python: Path, tmp_path: Path) -> None:
    blocks = quick_start_blocks(README.read_text(encoding="utf-8"))
    spec = {
        "readme": str(README),
        "context": READER_CONTEXT,
        "blocks": [{"line": b.line, "code": b.code} for b in blocks],
    }
    spec_file = tmp_path / "quick_start.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    runner = tmp_path / "run_quick_start.py"
    runner.write_text(RUNNER, encoding="utf-8")
    # -I: no PYTHONPATH, no user site, no script dir on sys.path, so only the venv's install
    # can be imported. -W error: a warning a user would see fails, as pytest's setting does.
    # cwd=tmp_path: the snippets write opt.pt and smoothness.jsonl where they run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = _run(
        [str(clean_python), "-I", "-W", "error", str(runner), str(spec_file)],
        cwd=tmp_path,
        env=env,
    )
    out = _ok(result)
    assert out.count(": ok") == len(blocks), out
    site = clean_python.parent.parent
    imported = out.rsplit("gluon_optim imported from ", 1)[1].strip()
    assert Path(imported).resolve().is_relative_to(site.resolve()), imported
