"""The wheel carries every sub-package of daemon/ and plugins/ (a package missing from
setup.cfg's list still imports in an editable install but vanishes from the wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_subpackage_and_entry_point(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("governord-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = []
    for top, package in (("daemon", "governord"), ("plugins", "governord/plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top)
            expected.append(f"{package}/{relative}/__init__.py".replace("/./", "/"))
    missing = [e for e in expected if e not in names]
    assert missing == []
    assert "governord/store/migrations/versions/0001_initial.py" in names
    assert "governord/store/migrations/script.py.mako" in names
    assert "governord/py.typed" in names
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "governord = governord.__main__:main" in text
    assert "governord-ctl = governord.ctl:main" in text
    for plugin in ("vsphere", "foreman", "satellite"):
        assert f"{plugin} = governord.plugins.{plugin}" in text
