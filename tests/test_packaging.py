"""Every source package is listed in pyproject.toml: a plain `pip install .` (the quick start) ships only the
packages named there, while the editable install the tests use would find a missing one anyway."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / path for name, path in tool["package-dir"].items()}
    found = set()
    for top, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            if "assets" in rel.parts:
                continue
            found.add(".".join([top, *rel.parts]) if rel.parts else top)
    assert found - set(tool["packages"]) == set(), "add these to [tool.setuptools] packages"
    assert "dlc.runtime.runners" in found
