"""The shipped priors' cards tell the truth a reuser relies on: no path of the machine they were
made on, and licences that are those of the volumes the weights were trained on."""

from __future__ import annotations

import json
import re

import pytest

from icmd_auto.prior import PRIOR_DIR

CARDS = sorted(PRIOR_DIR.glob("prior_x*.json"))
# an absolute path (a '/' that starts a name, not one inside a URL, a DOI or a relative path), a
# home folder or a drive letter
LOCAL_PATH = re.compile(
    r"(?:(?<![\w.:/\\-])/[\w.~-]|(?<![\w.])~[\w-]*/|(?<!\w)[A-Za-z]:[\\/](?!/))[^\s'\"),;]*"
)
CC_LICENCE = re.compile(r"CC BY(?:-[A-Z]{2})*(?: \d\.\d)?")
# The Cancer Imaging Archive's collections that the priors' data come from, and their licence
TCIA_LICENCES = {
    "LIDC-IDRI": "CC BY 3.0",
    "Pancreas-CT": "CC BY 3.0",
    "Soft-tissue-Sarcoma": "CC BY 3.0",
    "Lung-Fused-CT-Pathology": "CC BY 3.0",
    "Pancreatic-CT-CBCT-SEG": "CC BY 4.0",
    "CMB-CRC": "CC BY 4.0",
    "CPTAC-PDA": "CC BY 4.0",
}


def strings(value, where="card"):
    """(where, text) for every key and string value in a JSON document."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}[{key!r}] (the key)", str(key)
            yield from strings(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, f"{where}[{i}]")


def local_paths(document) -> list[str]:
    return [
        f"{where}: {m.group(0)!r} in {text[:120]!r}"
        for where, text in strings(document)
        for m in LOCAL_PATH.finditer(text)
    ]


def test_the_path_check_finds_what_it_must_and_nothing_else():
    for text in (
        "--out /tmp/pt/full_x3",
        "/work/prior_data/a.nii.gz",
        "(/home/me/ct)",
        "C:\\data\\ct",
        "~/ct",
        "D:/ct",
    ):
        assert local_paths({"command": text}), text
    assert local_paths({"/root/ct.nii.gz": {}}), "keys are checked too"
    for text in (
        "https://github.com/wasserth/TotalSegmentator, tests/reference_files/",
        "doi:10.7937/K9/TCIA.2015.LO9QL9SX",
        "../shared/data/ct/totalseg_chest_1.5mm.nii.gz",
        "clipped mean/std, 0.5/99.5 percentiles",
        "icmd_auto pretrain --data_dir prior_data --out x4",
    ):
        assert not local_paths({"command": text}), text


def test_every_factor_has_a_card():
    assert [p.name for p in CARDS] == [f"prior_x{r}.json" for r in (2, 3, 4, 5, 6)]


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.name)
def test_card_holds_no_local_path(card_path):
    found = local_paths(json.loads(card_path.read_text()))
    assert not found, f"{card_path.name}: {len(found)} local path(s), e.g. " + "; ".join(found[:3])


def test_priors_readme_holds_no_local_path():
    readme = (PRIOR_DIR / "README.md").read_text()
    assert not local_paths(readme), local_paths(readme)[:3]


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.name)
def test_card_licences_are_its_volumes_licences(card_path):
    card = json.loads(card_path.read_text())
    data = card["data"]
    unstated = [
        name for name, entry in data.items() if not entry.get("licence") or entry["licence"] == "not stated"
    ]
    assert not unstated, f"{card_path.name}: no licence for {len(unstated)} volume(s), e.g. {unstated[:3]}"
    per_volume = {entry["licence"] for entry in data.values()}
    assert isinstance(card.get("licences"), list), f"{card_path.name}: no combined 'licences' list"
    assert set(card["licences"]) == per_volume, (card["licences"], sorted(per_volume))
    for name, entry in data.items():
        url = entry.get("licence_url", "")
        version = re.search(r"/by/(\d\.\d)", url)
        if version:
            assert entry["licence"] == f"CC BY {version.group(1)}", (name, entry["licence"], url)
        described = " ".join(str(entry.get(k, "")) for k in ("collection", "attribution", "via"))
        for collection, licence in TCIA_LICENCES.items():
            # the collection's name, not a longer name or a patient ID that begins with it (Pancreas-CT-CB_001)
            if re.search(rf"(?<![\w-]){re.escape(collection)}(?![\w-])", described):
                assert entry["licence"] == licence, (
                    f"{name}: {collection} (TCIA) is {licence}, not {entry['licence']}"
                )
    # a free-text statement of the data's licence names the volumes' Creative Commons licences, no other
    if "data_licence" in card:
        named = set(CC_LICENCE.findall(card["data_licence"]))
        assert named == {lic for lic in per_volume if lic.startswith("CC BY")}, (named, sorted(per_volume))


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_every_shipped_card_states_its_compute_its_leases_and_its_curve(card_path):
    card = json.loads(card_path.read_text())
    assert isinstance(card.get("cpu_hours"), float) and card["cpu_hours"] >= 0, "CPU-hours in total"
    if card["cpu_hours"] == 0:
        assert card.get("gpu_hours", 0) > 0, "a prior trained on no CPU says what it trained on"
    leases = card.get("leases") or []
    assert leases and all(lease.get("command") and lease.get("steps", 0) > 0 for lease in leases), (
        "each lease"
    )
    assert sum(lease["steps"] for lease in leases) == card["iterations"]
    curve = card["validation"]["curve"]
    assert len(curve) >= 2 and curve[0]["iteration"] == 0 and curve[-1]["iteration"] <= card["iterations"]
    assert card["validation"]["best"] in curve
