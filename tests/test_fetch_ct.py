"""benchmarks/fetch_ct.py, the public CT the priors train on: the licences it may list, and a
series read from a git mirror's objects, checked against its pinned checksum, written or refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SERIES = REPO.parent / "shared" / "data" / "ct" / "totalseg_dicom_series"

spec = importlib.util.spec_from_file_location("fetch_ct", REPO / "benchmarks" / "fetch_ct.py")
fetch_ct = importlib.util.module_from_spec(spec)
sys.modules["fetch_ct"] = fetch_ct  # its dataclasses look their module up there
spec.loader.exec_module(fetch_ct)

# the licences that allow training and redistributing the trained weights (docs/DATA.md)
ALLOWED = {
    "CC BY 3.0": "https://creativecommons.org/licenses/by/3.0/",
    "CC BY 4.0": "https://creativecommons.org/licenses/by/4.0/",
}


def test_every_source_is_pinned_and_under_an_allowed_licence():
    names = [s.name for s in fetch_ct.SOURCES]
    assert len(names) == len(set(names)), "one output file per series"
    for s in fetch_ct.SOURCES:
        assert re.fullmatch(r"[a-z0-9_.]+", s.name), s.name
        assert ALLOWED.get(s.licence) == s.licence_url, f"{s.name}: {s.licence} {s.licence_url}"
        assert re.fullmatch(r"[0-9a-f]{40}", s.commit) and re.fullmatch(r"[0-9a-f]{64}", s.sha256), s.name
        assert len(s.shape) == 3 and len(s.spacing_mm) == 3, s.name
        assert "doi:" in s.attribution and s.via and s.collection, s.name


def git(*args: str, cwd: Path) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env={**os.environ, **env}
    ).stdout.strip()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> tuple[Path, object]:
    """A bare mirror (the fetch tool's layout) of a repository that commits a DICOM series, and
    the Source that pins it (its checksum read once, as --print_checksums does)."""
    if not SHARED_SERIES.is_dir():
        pytest.skip("needs ../shared/data (a DICOM series)")
    root = tmp_path_factory.mktemp("mirrors")
    work = root / "work"
    (work / "cases" / "ct").mkdir(parents=True)
    for i, f in enumerate(sorted(SHARED_SERIES.iterdir()), 1):  # named as the NBIA Data Retriever names them
        shutil.copy(f, work / "cases" / "ct" / f"1-{i:03d}.dcm")
    (work / "README.md").write_text("a series\n")
    git("init", "-q", cwd=work)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "series", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work)
    (root / "site+ct").mkdir()
    git("clone", "-q", "--bare", str(work), str(root / "site+ct" / "repo"), cwd=root)
    source = fetch_ct.Source(
        name="site_chest",
        repo="site/ct",
        commit=commit,
        path="cases/ct",
        anatomy="chest",
        collection="test",
        licence="CC BY 4.0",
        licence_url=ALLOWED["CC BY 4.0"],
        attribution="doi:10.0/test",
        via="a test repository",
        sha256="0" * 64,
        shape=(512, 512, 20),
        spacing_mm=(0.0, 0.0, 0.0),
    )
    volume, affine = fetch_ct.read_source(source, root, verify=False)
    pinned = dataclasses.replace(
        source, sha256=fetch_ct.voxel_sha256(volume), spacing_mm=fetch_ct.spacing_of(affine)
    )
    return root, pinned


def test_a_series_is_read_from_the_git_objects_and_written_with_its_record(mirror, tmp_path, monkeypatch):
    root, source = mirror
    monkeypatch.setattr(fetch_ct, "SOURCES", (source,))
    out = tmp_path / "data"
    assert fetch_ct.main(["--mirror_root", str(root), "--out", str(out)]) == 0
    img = nib.load(str(out / "site_chest.nii.gz"))
    data = np.asarray(img.dataobj)
    assert data.shape == (512, 512, 20) and data.dtype == np.int16 and data.min() >= fetch_ct.AIR_HU
    assert fetch_ct.voxel_sha256(data) == source.sha256
    (entry,) = json.loads((out / "sources.json").read_text())["series"]
    assert (
        entry["licence"] == "CC BY 4.0" and entry["commit"] == source.commit and entry["slices_written"] == 20
    )


def test_a_series_that_does_not_match_its_pin_is_refused_with_one_line(mirror, tmp_path, monkeypatch, capsys):
    root, source = mirror
    monkeypatch.setattr(fetch_ct, "SOURCES", (dataclasses.replace(source, sha256="f" * 64),))
    out = tmp_path / "data"
    assert fetch_ct.main(["--mirror_root", str(root), "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: ") and "site_chest" in lines[0], lines
    assert not list(out.glob("*.nii.gz"))
    assert json.loads((out / "sources.json").read_text())["refused"] == ["site_chest"]


def test_data_is_never_written_into_the_repository_history(tmp_path):
    with pytest.raises(SystemExit, match="not git-ignored"):
        fetch_ct.main(["--mirror_root", str(tmp_path), "--out", str(REPO / "docs" / "ct")])
    assert not (REPO / "docs" / "ct").exists()
