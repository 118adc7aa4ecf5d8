"""The wheel that `pip install` builds: every module and data file of `src/flexvar_hf`, and no packaging warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import REPO_ROOT


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    # A copy of what the build reads, so that the build's own folders land in tmp_path, not in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "src" / "flexvar_hf", source / "src" / "flexvar_hf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = completed.stdout + completed.stderr
    assert "would be ignored" not in log and "BuildBackendWarning" not in log, log[-3000:]

    (wheel,) = tmp_path.glob("flexvar_hf-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        path.relative_to(REPO_ROOT / "src").as_posix()
        for path in (REPO_ROOT / "src" / "flexvar_hf").rglob("*")
        if path.is_file() and path.suffix in (".py", ".json")
    }
    assert "flexvar_hf/data/imagenet_classes.json" in shipped
    assert shipped <= packaged, sorted(shipped - packaged)
