"""Public CT for the prior: known series read from fetched git mirrors, written as int16 HU NIfTI.

The prior networks learn from in-plane pairs made from axial slices only, so any real CT series,
thin or thick, is training data for them. SOURCES lists public CT series that sit in public GitHub
repositories as one-slice-per-file DICOM (loose or in a zip), each with its licence and
attribution. For each one this script

1. finds the repository's bare git mirror under ``--mirror_root`` (``<owner>+<name>/repo``, as the
   session's ``fetch`` tool writes it) and reads the series' files at the pinned commit straight
   from the git objects (``git ls-tree`` / ``git cat-file``; no work tree, nothing checked out);
2. reads them with the project's DICOM reader (``icmd_auto.fingerprint.load_case_array``: the
   series integrity checks, RescaleSlope/Intercept applied, the affine from
   ImagePositionPatient/ImageOrientationPatient in RAS);
3. raises values below air (-1024 HU: the scanner's fill outside the field of view) to air, and
   checks the sha256 of the int16 voxel array (the bytes of the (X, Y, Z) array in C order:
   stable across gzip and NIfTI writer versions), its shape and spacing against SOURCES, and
   refuses a mismatch with one line;
4. writes ``--out/<name>.nii.gz`` (int16 HU) and ``--out/sources.json``: what was written, from
   where, under which licence, for the model card.

``--max_mb`` keeps the written set under a size (a GPU lease carries about 40 MiB of data beside
the code): while the total is over it, the series with the most slices is rewritten with every
second, third, ... axial slice. In-plane pairs need axial slices only and adjacent slices are
near duplicates, so thinning costs little; sources.json records the stride.

Not here: the three shared volumes in ../shared/data/ct (pretrain.py reads them itself), and the
data kept for outside evaluation (docs/DATA.md lists what must never be added).

    python benchmarks/fetch_ct.py --mirror_root /work/.mirror --out /work/prior_data
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto.fingerprint import CaseReadError, load_case_array  # noqa: E402

CC_BY_3 = "https://creativecommons.org/licenses/by/3.0/"
TCIA_CITATION = (
    "Clark K, Vendt B, Smith K, et al. The Cancer Imaging Archive (TCIA): Maintaining and Operating "
    "a Public Information Repository. J Digit Imaging 26(6):1045-1057, 2013. doi:10.1007/s10278-013-9622-7"
)
LIDC_ATTRIBUTION = (
    "Armato III SG, McLennan G, Bidaut L, et al. (2015). Data From LIDC-IDRI. The Cancer Imaging "
    "Archive. doi:10.7937/K9/TCIA.2015.LO9QL9SX; Armato SG III et al., Med Phys 38:915-931, 2011; "
    "The authors acknowledge the National Cancer Institute and the Foundation for the National "
    "Institutes of Health, and their critical role in the creation of the free publicly available "
    "LIDC/IDRI Database used in this study; " + TCIA_CITATION
)
LIDC_VIA = (
    "drivendataorg/concept-to-clinic (MIT; tests/assets/test_image_data/ATTRIBUTION), the 'small' "
    "test subsets of three LIDC-IDRI series"
)
CONCEPT_TO_CLINIC = ("drivendataorg/concept-to-clinic", "3a2cea3aa54d9c1219f8516b91f61de583e79ddc")
LIDC_SMALL = "tests/assets/test_image_data/small"
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001."


@dataclass(frozen=True)
class Source:
    """One CT series in a public repository, pinned to a commit and to its decoded voxels."""

    name: str  # the output file's stem
    repo: str  # owner/name on GitHub
    commit: str
    path: str  # a folder of DICOM files, or a zip file in the repository
    anatomy: str
    collection: str
    licence: str
    licence_url: str
    attribution: str
    via: str  # who put it in the repository, and the file saying where it came from
    sha256: str  # of the int16 (X, Y, Z) voxel array in C order
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    zip_prefix: str = ""  # for a zip: the members under this folder are the series

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.commit[:10]}:{self.path}" + (
            f"!{self.zip_prefix}" if self.zip_prefix else ""
        )


def lidc_source(
    patient: int, study: str, series: str, anatomy: str, sha256: str, shape: tuple, spacing_mm: tuple
) -> Source:
    """One of concept-to-clinic's 'small' LIDC-IDRI series (``study``/``series``: UID suffixes)."""
    return Source(
        name=f"lidc_idri_{patient:04d}_chest_{spacing_mm[2]:g}mm",
        repo=CONCEPT_TO_CLINIC[0],
        commit=CONCEPT_TO_CLINIC[1],
        path=f"{LIDC_SMALL}/LIDC-IDRI-{patient:04d}/{UID}{study}/{UID}{series}",
        anatomy=anatomy,
        collection=f"LIDC-IDRI (TCIA), patient LIDC-IDRI-{patient:04d}",
        licence="CC BY 3.0",
        licence_url=CC_BY_3,
        attribution=LIDC_ATTRIBUTION,
        via=LIDC_VIA,
        sha256=sha256,
        shape=shape,
        spacing_mm=spacing_mm,
    )


SOURCES = (
    lidc_source(
        1,
        "298806137288633453246975630178",
        "179049373636438705059720603192",
        "chest (lung), GE LightSpeed, 2.5 mm",
        "b23ab7bb96f8c0f9b8326faca1e0b9f89962a2c12f31c4b813194eaa93b7d97d",
        (512, 512, 16),
        (0.7031, 0.7031, 2.5),
    ),
    lidc_source(
        2,
        "490157381160200744295382098329",
        "619372068417051974713149104919",
        "chest (lung), GE, 1.25 mm",
        "9bac99360e3af9ec53f24066d598d21a9a1d03f1ba3f89d9b70e50ee9075b0c5",
        (512, 512, 12),
        (0.6816, 0.6816, 1.25),
    ),
    lidc_source(
        3,
        "101370605276577556143013894866",
        "170706757615202213033480003264",
        "chest (lung), 2.5 mm",
        "07984132aa8f79a5ecdeeb268870e319932a5e36e3a2af3ab73d4946973ba210",
        (512, 512, 11),
        (0.8203, 0.8203, 2.5),
    ),
    Source(
        name="pancreas_ct_0001_abdomen_1mm",
        repo="muschellij2/fixing_dicom_files",
        commit="878f459d5c3959c3803c7cd976d4717d5cf32db0",
        path="study_time_variation/data.zip",
        zip_prefix="test/",
        anatomy="abdomen (pancreas level, contrast-enhanced), 1 mm",
        collection="Pancreas-CT (TCIA), patient PANCREAS_0001",
        licence="CC BY 3.0",
        licence_url=CC_BY_3,
        attribution=(
            "Roth HR, Farag A, Turkbey EB, Lu L, Liu J, Summers RM. (2016). Data From Pancreas-CT. "
            "The Cancer Imaging Archive. doi:10.7937/K9/TCIA.2016.tNB1kqBU; " + TCIA_CITATION
        ),
        via=(
            "muschellij2/fixing_dicom_files (study_time_variation/index.Rmd names the source), "
            "12 consecutive slices of one series"
        ),
        sha256="2ab8c93ea2f3add21725dbd2c8dc6ed9967efb72986f6d8b8e94aa43c94dbdc2",
        shape=(512, 512, 12),
        spacing_mm=(0.8594, 0.8594, 1.0),
    ),
)

IBSI = ("theibsi/data_sets", "6da96021bc91faf4c0cb7fd7fa56a4225d2064a8")
STS_ATTRIBUTION = (
    "Vallieres M, Freeman CR, Skamene SR, El Naqa I. (2015). A radiomics model from joint FDG-PET and MRI "
    "texture features for the prediction of lung metastases in soft-tissue sarcomas of the extremities. "
    "The Cancer Imaging Archive. doi:10.7937/K9/TCIA.2015.7GO2GSKS; Vallieres M et al., Phys Med Biol "
    "60(14):5471, 2015; " + TCIA_CITATION + "; the IBSI validation data set (Zwanenburg A et al., "
    "github.com/theibsi/data_sets)"
)
# The IBSI validation data set: the CT of the 51 patients of TCIA's Soft-tissue-Sarcoma collection,
# cropped by the IBSI to 5 cm around the tumour (limbs). STS number: (shape, sha256).
STS_PINS = {
    1: ((198, 202, 59), "94768424de9fdaaedb1f57373ef6b6520ba46d83571722f4e9c476aae0ac6273"),
    2: ((161, 143, 48), "a5adc8b8c7381426ef19d3650ac4253ca869af0f117cc376a8f5976ee5a5937a"),
    3: ((154, 158, 51), "adc06741e5dcabeda82b6f31862445b2bc4301e61e271edf71ddb304ecbcf6a3"),
    4: ((173, 183, 85), "48b9610552fca74c4e4c82837d900262f33f57564b0244dc4b17873595ae3f3c"),
    5: ((162, 199, 79), "8d4f88ae9ac198d66d23f0810279e25ac159367e7de0fdb5eff906e09725bddc"),
    6: ((184, 157, 68), "eb25f6bdb3681e05fba53aaef5339e4ddb9874ab16e47496cd399ff8ff30f842"),
    7: ((249, 215, 70), "284e90bf4cbbd7d0583705fea7d77342a967ad5d91f7dee5606d1598356a8965"),
    8: ((141, 137, 51), "b149987d191ef50b13efc66e321394128bb288d6b5cbc4af63f8b89bf7c558e5"),
    9: ((243, 238, 83), "d797278ef69465d45b50cfedecf10c33b6904538003f13908b5c3b2dae556826"),
    10: ((185, 164, 59), "17b1d9f76d22a4483a900842c3377da07abf82a0c2070f3db3e835da5492a91b"),
    11: ((229, 214, 74), "2107fd12bfb34b79f3dfb751c1adbacdb7fc1f4bf798745edac215cf43c50e16"),
    12: ((159, 155, 53), "899ea31828d887602a307e6d4a127584f96fd4e961c361d30cdf35618133556e"),
    13: ((252, 215, 114), "4a6e4377603b7e0ad43d9aa99825b292bacd8761e0f8702b53d224ffd0b57c82"),
    14: ((197, 178, 65), "88819c8d1d5dcd6fed43c30e7ce8bf77729d264a67cefdbe06fb29c8881c4e4b"),
    15: ((158, 165, 57), "98d2f2fb9765f41d50913a9e8263094d73e5f329fb1787e134f569fb3b8f67b5"),
    16: ((218, 206, 71), "33adb625bb79bea6d2453a43ec0810154d3e37927adb5c42b1bbb6b2647b109d"),
    17: ((239, 211, 71), "5a98f9bf893f933a06d56403839dcf5e64ba50ad32ad762dbb68d8620e9ac291"),
    18: ((172, 160, 55), "a54e63e467cdc37513ab615dba3fd91a57b04be6b8089c5ae8b17c0fc106fba4"),
    19: ((136, 134, 47), "c2591e72693bc1be6cde4a621f1e9f28d8ab224ca8b52580e3628935d3c3bdda"),
    20: ((241, 304, 97), "d4437f564251275a40563b01c6f50e43bcd2fbcac41bec230e99a161c6e2256d"),
    21: ((219, 216, 83), "ee18b494df5905ec5e3b86252a9a73520de845599e49734591c45927b17de444"),
    22: ((219, 232, 54), "c28626da3542cb631b1115201a1470e02729330c044d800b55a2a4ef2fdb9f51"),
    23: ((179, 182, 66), "fa732728dcaee8e815113e3a5e859787025375da3ebc59978551036d7f865528"),
    24: ((150, 155, 55), "21c7e765d209706a7dffe9da8ef87a55ae8fcb4b878bd6bd7d22255f5a0a81a5"),
    25: ((149, 138, 47), "e0f2fb8061d1020b6132f439ee26aeff374a71e1d8b4ff489b9a20cbdcb011bf"),
    26: ((189, 190, 52), "e91582d991ab571a977562bf2171ad2c820b1659ba02600435f6d6f953d1f280"),
    27: ((204, 239, 82), "18921bd9f2f84593fcbc35366813e245945dd353996c78c7232ed53ea0297d61"),
    28: ((173, 176, 68), "d59bd7b26e426d800eacc30ba42e89841e655caff3e98fa60bb6b3c8032fc851"),
    29: ((191, 174, 62), "9b1c578d173b2aafb899c584bdce60633600d90b7b013afadb7916af9fe58654"),
    30: ((188, 233, 73), "b5f57966443d718b2c3555446638f66bd20b88cc65e6f3c2bda7bcc525ecd04b"),
    31: ((189, 210, 67), "55de5a782997833fddaf762be4b85d4826efb63777718549be972ff90e5e9310"),
    32: ((163, 164, 54), "e3772f69a9b6492c318559c13bdb62bd1705606ff181d75ead74e2c1e9e5f37b"),
    33: ((196, 204, 61), "a4b7afef218234fc98d47d0f15badcaa40e031bc70ad156c2a833dba28450fd8"),
    34: ((215, 220, 55), "8964e4018b39c9eed066613ccfc4c2c01c089311c6bc6c013dcd22c856fb8593"),
    35: ((139, 154, 63), "be411bfeeaa9bee081d54a82b15695efda977e02f49a0f389f9acf61327893e8"),
    36: ((192, 192, 68), "398278bb26d7accf5edd0ba20e735e48849466549b50087aaef702b094def555"),
    37: ((252, 203, 75), "e65a6f5bda750b40a7657486315fcf5182711d6bc3fa0749f969efff796bad7b"),
    38: ((193, 190, 59), "6b084464e50ec4eed41f65bb0779c8a61e07349b736a2f444e2d6722487075be"),
    39: ((213, 188, 79), "89c2c0a63a0b5b385403df4c8c119875390d0fda4b0b8bf0327812054b415a11"),
    40: ((194, 204, 66), "3290379f3caff26c0a36c6018f04e5da753d3d68bb7b53e0a0f976694621fade"),
    41: ((153, 163, 53), "edc564d532751b9927f975b40ef96dce30cd04a0a83c3ce5c8fc2b649cd2151f"),
    42: ((134, 162, 49), "fb4303324fa9368bfde2338f96b8781614c92fd854c5a11a4ca6e3f077583c52"),
    43: ((155, 166, 70), "16395bd05564ad7378c1977741f5fb7155160329ece463b90051a9db40063943"),
    44: ((234, 216, 53), "ff3c9c31eff0b67ff96e3ec2953ad591516d79311866a4cd3b7c2c7e6ba848d5"),
    45: ((220, 218, 74), "29df4900d453bc6eaac34a53a4394ffc8c7165cbb991f8531b7617deb92edf16"),
    46: ((212, 210, 84), "5dae0e0da75f5e6469748e2084b90cc18456587579cca3a1ebb3e11656092a04"),
    47: ((185, 177, 58), "ccc53805fe83df7352e10018c063b7e0209a12fd96ec677af76cc21958edbc15"),
    48: ((195, 185, 57), "ecc9b2557e0a5e6859c244077ac0bf4f90c3c8afb6bd78d77f36a045e08a8fc3"),
    49: ((232, 205, 92), "b9d876f01624654c40dd04071bc59b3a641e1e33725ceb26e4fb787088ec9d77"),
    50: ((171, 168, 52), "9c74c64e9d19ada30d26b002b2d19cda0ecbfafa8f08d87fa3c5f3fef6ef1ca5"),
    51: ((177, 162, 61), "708474287a054d17ffa355aa2ed31b4460efeb141dfdf7481e5c5053da3065bd"),
}


def soft_tissue_sarcoma(number: int) -> Source:
    shape, digest = STS_PINS[number]
    return Source(
        name=f"sts_{number:03d}_extremity_3.27mm",
        repo=IBSI[0],
        commit=IBSI[1],
        path=f"ibsi_validation/dicom/STS_{number:03d}/CT/image",
        anatomy="limb (soft-tissue sarcoma), GE, 3.27 mm, cropped to 5 cm around the tumour",
        collection=f"Soft-tissue-Sarcoma (TCIA) via the IBSI validation data set, case STS_{number:03d}",
        licence="CC BY 3.0",
        licence_url=CC_BY_3,
        attribution=STS_ATTRIBUTION,
        via="theibsi/data_sets (ibsi_validation/README.md and LICENSE.md: CC BY 3.0)",
        sha256=digest,
        shape=shape,
        spacing_mm=(0.9766, 0.9766, 3.27),
    )


SOURCES = SOURCES + tuple(soft_tissue_sarcoma(n) for n in range(1, 52))

CC_BY_4 = "https://creativecommons.org/licenses/by/4.0/"
LUNG_PET_CT_DX = ("huyenbui117/lung_CT", "520adfe9e2e8e2b8c02985b228002c5b2997e5b6")
LUNG_PET_CT_DX_DIR = "Lung-PET-CT-Dx/manifest-1675442780019/Lung-PET-CT-Dx"
A0002_STUDY = "Lung_Dx-A0002/04-25-2007-NA-ThoraxAThoraxRoutine Adult-34834"
LUNG_PET_CT_DX_ATTRIBUTION = (
    "Li P, Wang S, Li T, Lu J, HuangFu Y, Wang D. (2020). A Large-Scale CT and PET/CT Dataset for Lung "
    "Cancer Diagnosis (Lung-PET-CT-Dx) [Data set]. The Cancer Imaging Archive. "
    "doi:10.7937/TCIA.2020.NNC2-0461; " + TCIA_CITATION
)


def lung_pet_ct_dx(
    name: str, series: str, anatomy: str, sha256: str, shape: tuple, spacing_mm: tuple
) -> Source:
    """One whole CT series of huyenbui117/lung_CT's Lung-PET-CT-Dx download (``series``: its
    folder under the collection's folder, as the NBIA Data Retriever named it)."""
    return Source(
        name=name,
        repo=LUNG_PET_CT_DX[0],
        commit=LUNG_PET_CT_DX[1],
        path=f"{LUNG_PET_CT_DX_DIR}/{series}",
        anatomy=anatomy,
        collection=f"Lung-PET-CT-Dx (TCIA), patient {series.split('/')[0]}",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=LUNG_PET_CT_DX_ATTRIBUTION,
        via=(
            "huyenbui117/lung_CT (an NBIA Data Retriever download committed whole: the collection's "
            "LICENSE, CC BY 4.0, and metadata.csv beside the series)"
        ),
        sha256=sha256,
        shape=shape,
        spacing_mm=spacing_mm,
    )


SOURCES = SOURCES + (
    lung_pet_ct_dx(
        "lung_pet_ct_dx_a0001_chest_5mm_l",
        "Lung_Dx-A0001/04-04-2007-NA-Chest-07990/2.000000-5mm-40805",
        "chest, Philips Brilliance 16, 5 mm, lung kernel L",
        "6f8e1cb893a319db379dddd1f6f45b3649cbdb1ffdcd96db54bc0779fd646c44",
        (512, 512, 64),
        (0.8418, 0.8418, 5.0),
    ),
    lung_pet_ct_dx(
        "lung_pet_ct_dx_a0001_chest_5mm_b",
        "Lung_Dx-A0001/04-04-2007-NA-Chest-07990/3.000000-5mm-41315",
        "chest, Philips Brilliance 16, 5 mm, standard kernel B (same scan as kernel L)",
        "db1ce8a6827e77e5f84cb1f50c960231942041286a5ada8ca9be03bd49e980a7",
        (512, 512, 64),
        (0.8418, 0.8418, 5.0),
    ),
    lung_pet_ct_dx(
        "lung_pet_ct_dx_a0002_chest_8mm_b70f",
        f"{A0002_STUDY}/2.000000-ThoraxRoutine  8.0.0  B70f-62919",
        "chest, Siemens, 8 mm, sharp kernel B70f",
        "27ee6b753ece213c23d0712f48c11b031ae1e54ad5121f3b1b35f246f70332a7",
        (512, 512, 30),
        (0.6465, 0.6465, 8.0),
    ),
    lung_pet_ct_dx(
        "lung_pet_ct_dx_a0002_chest_8mm_b40f",
        f"{A0002_STUDY}/3.000000-ThoraxRoutine  8.0.0  B40f-10983",
        "chest, Siemens, 8 mm, soft kernel B40f (same scan as B70f)",
        "954865abf56a154a391ffa4dbdb18feba1f7a0736ec45df311d5344113a92b1c",
        (512, 512, 30),
        (0.6465, 0.6465, 8.0),
    ),
    Source(
        name="cptac_lscc_c3n_00247_chest_3mm",
        repo="deep-learning-with-pytorch/dlwpt-code",
        commit="d6c0210143daa133bbdeddaffc8993b1e17b5174",
        path="data/p1ch4/volumetric-dicom/2-LUNG 3.0  B70f-04083",
        anatomy="chest (contrast), Siemens Sensation 16, 3 mm, kernel B70f",
        collection="CPTAC-LSCC (TCIA), patient C3N-00247",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=(
            "National Cancer Institute Clinical Proteomic Tumor Analysis Consortium (CPTAC). (2018). The "
            "Clinical Proteomic Tumor Analysis Consortium Lung Squamous Cell Carcinoma Collection "
            "(CPTAC-LSCC) [Data set]. The Cancer Imaging Archive. doi:10.7937/K9/TCIA.2018.6EMUB5L2; "
            + TCIA_CITATION
        ),
        via=(
            "deep-learning-with-pytorch/dlwpt-code (the book's chapter 4 example); the repository names no "
            "source: the files' own headers do (TCIA UID root 1.3.6.1.4.1.14519.5.2.1, TCIA's CTP project "
            "tag (0013,1010) 'CPTAC-LSCC', PatientID C3N-00247, de-identified per PS3.15 Annex E)"
        ),
        sha256="d4e3f2b360627b1a97332cc542480b7b722f43673fa55311cb744d2ad390ecae",
        shape=(512, 512, 99),
        spacing_mm=(0.5645, 0.5645, 3.0),
    ),
    Source(
        name="cc_tumor_heterogeneity_ccth_a01_trunk_2.5mm",
        repo="Marcus-Milantoni/Slicer_scripting_tutorial",
        commit="0b488164b59dec44ac980a3b8f2a5635e0efc46f",
        path="example_patients/cervical_cancer/CT_images",
        anatomy="neck to upper thighs (the CT of an FDG PET/CT, cervical cancer), GE, 2.5 mm, STANDARD",
        collection="CC-Tumor-Heterogeneity (TCIA), patient CCTH-A01",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=(
            "Mayr N, Yuh WTC, Bowen S, Harkenrider M, Knopp MV, Lee EY-P, Leung E, Lo SS, Small W Jr, "
            "Wolfson AH. (2023). Cervical Cancer - Tumor Heterogeneity: Serial Functional and Molecular "
            "Imaging Across the Radiation Therapy Course in Advanced Cervical Cancer "
            "(CC-Tumor-Heterogeneity) (Version 1) [Data set]. The Cancer Imaging Archive. "
            "doi:10.7937/ERZ5-QZ59; " + TCIA_CITATION
        ),
        via=(
            "Marcus-Milantoni/Slicer_scripting_tutorial (MIT code; README.md, 'Cervical Cancer', names the "
            "collection and its citation), the whole CT series of the PET/CT"
        ),
        sha256="a6f93a687dcea21d2b2f8a022385427545bedbf63b3015b7ba282621f3b127ac",
        shape=(512, 512, 296),
        spacing_mm=(0.9355, 0.9355, 2.5),
    ),
    Source(
        name="pancreatic_ct_cbct_seg_cb001_abdomen_3mm",
        repo="pyvista/vtk-data",
        # on refs/pull/5/head only (a pull request replaced before it was merged): a plain clone
        # does not bring it; `git fetch origin refs/pull/5/head` does (the fetch tool's snapshot has it)
        commit="c43678d0d972d416e06c3ca8b9e42d79bddd1716",
        path="Data/DICOM_Stack",
        anatomy="lower chest to pelvis (contrast, breath-hold planning CT), Philips, 3 mm, kernel B",
        collection="Pancreatic-CT-CBCT-SEG (TCIA), patient Pancreas-CT-CB_001",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=(
            "Hong J, Reyngold M, Crane C, Cuaron J, Hajj C, Mann J, Zinovoy M, Yorke E, LoCastro E, Apte AP, "
            "Mageras G. (2021). Breath-hold CT and cone-beam CT images with expert manual organ-at-risk "
            "segmentations from radiation treatments of locally advanced pancreatic cancer "
            "(Pancreatic-CT-CBCT-SEG) [Data set]. The Cancer Imaging Archive. doi:10.7937/TCIA.ESHQ-4D90; "
            "Han X et al., Med Phys 48(6):3084-3095, 2021, doi:10.1002/mp.14906; " + TCIA_CITATION
        ),
        via=(
            "pyvista/vtk-data, pull request 5 (an NBIA Data Retriever download: the collection's LICENSE, "
            "CC BY 4.0, and Citations beside the series in Data/DICOM_Stack); the files carry TCIA's CTP "
            "project tag (0013,1010) 'Pancreatic-CT-CBCT-SEG'"
        ),
        sha256="e36f018019af53adff9162dbde6941197ec30f8f947caccb9d061bd6b0b2420b",
        shape=(512, 512, 134),
        spacing_mm=(1.0742, 1.0742, 3.0),
    ),
)
# One TCIA series each that a student or tutorial committed whole, as the NBIA Data Retriever wrote
# it (named 1-001.dcm ...) or renumbered; the holding repositories state no data licence: the
# files name the collection themselves (TCIA's CTP project tag (0013,1010), PatientID, TCIA's UID
# root, de-identification per PS3.15 Annex E) and the collection's licence is TCIA's (docs/DATA.md).
TCIA_UPLOAD_VIA = (
    "{repo} (a whole series committed as downloaded, no data licence of its own); the files carry TCIA's "
    "CTP project tag (0013,1010) '{tag}', PatientID {patient}, TCIA's UID root 1.3.6.1.4.1.14519.5.2.1 "
    "and de-identification per PS3.15 Annex E"
)
SOURCES = SOURCES + (
    Source(
        name="lung_fused_ct_pathology_lungfcp_01_0001_chest_1mm",
        repo="fuzun45/tahaFuzun-habibOzdemir-bitirmeTezi",
        commit="1b18ccb6ef26513701286c41f7d6a784479d4b08",
        path="data",
        anatomy="chest (non-contrast), Siemens, 2 mm slices every 1 mm, kernel B31f",
        collection="Lung-Fused-CT-Pathology (TCIA), patient LungFCP-01-0001",
        licence="CC BY 3.0",
        licence_url=CC_BY_3,
        attribution=(
            "Rusu M, Rajiah P, Gilkeson R, Yang M, Donatelli C, Thawani R, Jacono FJ, Linden P, Madabhushi A. "
            "Lung-Fused-CT-Pathology [Data set]. The Cancer Imaging Archive. doi:10.7937/K9/TCIA.2018.SMT36LPN; "
            "Rusu M et al., Eur Radiol 27(10):4209-4217, 2017, doi:10.1007/s00330-017-4813-0; "
            + TCIA_CITATION
        ),
        via=TCIA_UPLOAD_VIA.format(
            repo="fuzun45/tahaFuzun-habibOzdemir-bitirmeTezi",
            tag="Lung-Fused-CT-Pathology",
            patient="LungFCP-01-0001",
        ),
        sha256="d48202033076bc17b3f87c25dedec8a6273c0329312ac55994b8c511a6b087ef",
        shape=(512, 512, 98),
        spacing_mm=(0.7598, 0.7598, 1.0),
    ),
    Source(
        name="cmb_crc_msb_01068_chest_2.5mm",
        repo="stepha-mar/Colon",
        commit="d2bd890396a1779ad10edca87ffd3dc83068b658",
        path=".",
        anatomy="chest to upper abdomen (contrast), GE, 2.5 mm, kernel LUNG",
        collection="CMB-CRC (TCIA), patient CMB-CRC-MSB-01068",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=(
            "Cancer Moonshot Biobank. (2022). Cancer Moonshot Biobank - Colorectal Cancer Collection (CMB-CRC) "
            "[Data set]. The Cancer Imaging Archive. doi:10.7937/DJG7-GZ87; " + TCIA_CITATION
        ),
        via=TCIA_UPLOAD_VIA.format(repo="stepha-mar/Colon", tag="CMB-CRC", patient="CMB-CRC-MSB-01068"),
        sha256="19a54bcbcf116e165d72532beb7153a26d66d85ac5c5878ad09d2c2898bfa607",
        shape=(512, 512, 100),
        spacing_mm=(0.8984, 0.8984, 2.5),
    ),
    Source(
        name="cptac_pda_c3l_00189_abdomen_5mm",
        repo="stepha-mar/sasrcoma",
        commit="0ecd8fe3f1e013165a16d3ae3d1301a1fe732b93",
        path=".",
        anatomy="upper abdomen and lung bases (contrast), GE Revolution, 5 mm, kernel LUNG",
        collection="CPTAC-PDA (TCIA), patient C3L-00189",
        licence="CC BY 4.0",
        licence_url=CC_BY_4,
        attribution=(
            "National Cancer Institute Clinical Proteomic Tumor Analysis Consortium (CPTAC). (2018). The Clinical "
            "Proteomic Tumor Analysis Consortium Pancreatic Ductal Adenocarcinoma Collection (CPTAC-PDA) "
            "(Version 15) [Data set]. The Cancer Imaging Archive. doi:10.7937/K9/TCIA.2018.SC20FO18; "
            + TCIA_CITATION
        ),
        via=TCIA_UPLOAD_VIA.format(repo="stepha-mar/sasrcoma", tag="CPTAC-PDA", patient="C3L-00189"),
        sha256="66d4003332f755a0c21bf59bd588d1c59503485f98e2f82daaeeb07a7676b905",
        shape=(512, 512, 35),
        spacing_mm=(0.8594, 0.8594, 5.0),
    ),
    Source(
        # the whole series of which lidc_idri_0001_chest_2.5mm is a 16-slice subset: a data folder
        # takes one or the other (fetch_ct.py --sources)
        name="lidc_idri_0001_chest_2.5mm_whole",
        repo="profmcdan/dicom-project",
        commit="588f867046cc97f9149eaa08ebcff56cae227c18",
        path="data/767",
        anatomy="chest (LIDC-IDRI-0001, all 133 slices), GE, 2.5 mm",
        collection="LIDC-IDRI (TCIA), patient LIDC-IDRI-0001",
        licence="CC BY 3.0",
        licence_url=CC_BY_3,
        attribution=LIDC_ATTRIBUTION,
        via=(
            "profmcdan/dicom-project (a whole series committed, no data licence of its own); the files carry "
            "PatientID LIDC-IDRI-0001 and the series UID of the concept-to-clinic subset"
        ),
        sha256="f3459f73547619ec82cc21d47218fc0b200c2155cc7548aa5cf827d7d8ab4004",
        shape=(512, 512, 133),
        spacing_mm=(0.7031, 0.7031, 2.5),
    ),
)
SPACING_TOLERANCE_MM = 1e-3
# Below air there is no tissue: what a series holds there is the scanner's fill for pixels outside
# the reconstructed field of view (LIDC-IDRI: -2048 or -3024 HU, about a fifth of each slice). It is
# raised to air, so that the prior does not learn the edge of the field of view nor the
# intensity standardisation stretch to cover the fill.
AIR_HU = -1024


class SourceError(RuntimeError):
    """A source that cannot be read or does not match SOURCES; the message is one line."""


def git_dir(mirror_root: Path, repo: str) -> Path:
    """The bare git directory of ``repo`` under ``mirror_root`` (``owner+name/repo``, or a work
    tree's ``.git`` there)."""
    base = mirror_root / repo.replace("/", "+")
    for candidate in (base / "repo", base / "repo" / ".git", base):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    raise SourceError(f"{repo}: no git mirror under {base} (fetch github:{repo} first)")


def git(gdir: Path, *args: str) -> bytes:
    result = subprocess.run(["git", f"--git-dir={gdir}", *args], capture_output=True)
    if result.returncode != 0:
        raise SourceError(f"git {' '.join(args)} in {gdir}: {result.stderr.decode().strip()[:200]}")
    return result.stdout


def blob(gdir: Path, commit: str, path: str) -> bytes:
    try:
        return git(gdir, "cat-file", "blob", f"{commit}:{path}")
    except SourceError:
        raise SourceError(
            f"{path} at {commit[:10]}: not in the mirror {gdir} (snapshots leave out files of 4 MiB "
            "and more, and Git LFS content)"
        ) from None


def extract_series(source: Source, gdir: Path, folder: Path) -> int:
    """Write the series' DICOM files from the git objects into ``folder``; returns their count."""
    if git(gdir, "cat-file", "-t", source.commit).strip() != b"commit":
        raise SourceError(f"{source.repo}: commit {source.commit} is not a commit in {gdir}")
    files: dict[str, bytes] = {}
    if source.zip_prefix:
        with zipfile.ZipFile(io.BytesIO(blob(gdir, source.commit, source.path))) as archive:
            for member in archive.namelist():
                if member.startswith(source.zip_prefix) and not member.endswith("/"):
                    files[Path(member).name] = archive.read(member)
    else:
        listing = git(gdir, "ls-tree", "-r", "-z", "--name-only", source.commit, "--", source.path)
        for path in filter(None, listing.decode().split("\0")):
            if path.lower().endswith(".dcm"):
                files[Path(path).name] = blob(gdir, source.commit, path)
    if not files:
        raise SourceError(f"{source.where}: no DICOM files there")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return len(files)


def git_ignored(path: Path) -> bool:
    """``path`` (in this repository) is ignored by git, so data written there stays out of commits."""
    return subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)]).returncode == 0


def voxel_sha256(volume: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(volume, dtype=np.int16).tobytes()).hexdigest()


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0))


def read_source(source: Source, mirror_root: Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU volume (X, Y, Z), values below AIR_HU raised to it; RAS affine) of one source,
    checked against SOURCES."""
    gdir = git_dir(mirror_root, source.repo)
    with tempfile.TemporaryDirectory(prefix=f"{source.name}_") as tmp:
        extract_series(source, gdir, Path(tmp))
        try:
            array, affine, _ = load_case_array(tmp)
        except CaseReadError as e:
            raise SourceError(f"{source.where}: {str(e).replace(tmp, 'series')}") from None
    if not np.array_equal(array, np.rint(array)) or array.min() < -32768 or array.max() > 32767:
        raise SourceError(f"{source.where}: HU values are not int16 integers")
    volume = np.maximum(array, AIR_HU).astype(np.int16)
    if verify:
        digest = voxel_sha256(volume)
        if digest != source.sha256:
            raise SourceError(
                f"{source.name}: voxel sha256 {digest[:16]}... is not the pinned {source.sha256[:16]}... "
                f"({source.where}); not written"
            )
        spacing = spacing_of(affine)
        if volume.shape != source.shape or not np.allclose(
            spacing, source.spacing_mm, atol=SPACING_TOLERANCE_MM
        ):
            raise SourceError(
                f"{source.name}: shape {volume.shape}, spacing {spacing} mm is not the pinned "
                f"{source.shape}, {source.spacing_mm} mm; not written"
            )
    return volume, affine


def write_nifti(volume: np.ndarray, affine: np.ndarray, path: Path, stride: int) -> None:
    """int16 NIfTI of every ``stride``-th axial slice; the affine's slice step grows to match."""
    kept = affine.copy()
    kept[:3, 2] *= stride
    image = nib.Nifti1Image(np.ascontiguousarray(volume[:, :, ::stride]), kept)
    image.set_data_dtype(np.int16)
    image.header.set_xyzt_units("mm")
    image.set_qform(kept, code=1)
    image.set_sform(kept, code=1)
    nib.save(image, str(path))


def record(source: Source, volume: np.ndarray, affine: np.ndarray, path: Path, stride: int) -> dict:
    return {
        "file": path.name,
        "name": source.name,
        "anatomy": source.anatomy,
        "collection": source.collection,
        "licence": source.licence,
        "licence_url": source.licence_url,
        "attribution": source.attribution,
        "repository": f"https://github.com/{source.repo}",
        "commit": source.commit,
        "path": source.path + (f" (zip members {source.zip_prefix}*)" if source.zip_prefix else ""),
        "via": source.via,
        "voxel_sha256_int16": source.sha256 or voxel_sha256(volume),
        "shape": list(volume.shape),
        "spacing_mm": list(spacing_of(affine)),
        "slice_stride": stride,
        "slices_written": len(range(0, volume.shape[2], stride)),
        "bytes": path.stat().st_size,
    }


def thin_to_budget(entries: dict, volumes: dict, out: Path, max_bytes: int) -> None:
    """Thin the series with the most written slices to its next stride (every 2nd, 3rd, ... axial
    slice) until the set fits. Sizes are predicted from each file's bytes per slice, the changed
    files rewritten and measured, and thinning goes on while the measured set is still over."""
    per_slice = {n: e["bytes"] / e["slices_written"] for n, e in entries.items()}
    strides = {n: e["slice_stride"] for n, e in entries.items()}

    def written(name: str) -> int:
        return len(range(0, volumes[name][1].shape[2], strides[name]))

    while sum(e["bytes"] for e in entries.values()) > max_bytes:
        while sum(per_slice[n] * written(n) for n in entries) > max_bytes:
            name = max(entries, key=written)
            if written(name) <= 1:
                raise SystemExit(
                    f"--max_mb: {max_bytes / 2**20:.1f} MiB cannot hold one slice of every series"
                )
            strides[name] += 1
        for name, entry in entries.items():
            if strides[name] != entry["slice_stride"]:
                source, volume, affine = volumes[name]
                path = out / entry["file"]
                write_nifti(volume, affine, path, strides[name])
                entries[name] = record(source, volume, affine, path, strides[name])
                per_slice[name] = entries[name]["bytes"] / entries[name]["slices_written"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mirror_root",
        type=Path,
        default=Path("/work/.mirror"),
        help="folder of git mirrors, <owner>+<name>/repo each (the fetch tool's layout)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: outside the repository, or a git-ignored folder in it (runs/)",
    )
    parser.add_argument(
        "--sources",
        nargs="*",
        default=None,
        metavar="NAME",
        help=f"only these series (default: all): {', '.join(s.name for s in SOURCES)}",
    )
    parser.add_argument(
        "--max_mb",
        type=float,
        default=None,
        help="keep the written .nii.gz files under this many MiB by thinning the longest series",
    )
    parser.add_argument(
        "--print_checksums",
        action="store_true",
        help="read every source and print its voxel sha256, shape and spacing; write nothing",
    )
    args = parser.parse_args(argv)

    by_name = {s.name: s for s in SOURCES}
    unknown = sorted(set(args.sources or ()) - set(by_name))
    if unknown:
        raise SystemExit(f"--sources {unknown}: not one of {sorted(by_name)}")
    chosen = [by_name[n] for n in args.sources] if args.sources else list(SOURCES)

    if args.print_checksums:
        for source in chosen:
            volume, affine = read_source(source, args.mirror_root, verify=False)
            print(
                f"{source.name}: sha256={voxel_sha256(volume)} shape={volume.shape} spacing={spacing_of(affine)}"
            )
        return 0

    if args.out.resolve().is_relative_to(REPO) and not git_ignored(args.out.resolve()):
        raise SystemExit(
            f"--out {args.out}: inside the repository and not git-ignored; third-party data stays out of "
            "its history (use a folder outside it, or an ignored one such as runs/)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    entries, volumes, refused = {}, {}, []
    for source in chosen:
        try:
            volume, affine = read_source(source, args.mirror_root)
        except SourceError as e:
            print(f"refused: {e}", file=sys.stderr)
            refused.append(source.name)
            continue
        path = args.out / f"{source.name}.nii.gz"
        write_nifti(volume, affine, path, 1)
        volumes[source.name] = (source, volume, affine)
        entries[source.name] = record(source, volume, affine, path, 1)
        print(f"{path}: {volume.shape} {spacing_of(affine)} mm, {source.licence}")
    if args.max_mb is not None:
        thin_to_budget(entries, volumes, args.out, int(args.max_mb * 2**20))

    total = sum(e["bytes"] for e in entries.values())
    manifest = {
        "written_by": "benchmarks/fetch_ct.py",
        "checksum": (
            "sha256 of the int16 (X, Y, Z) voxel array in C order (values below -1024 HU raised to "
            "-1024), all slices, before any thinning"
        ),
        "max_mb": args.max_mb,
        "total_bytes": total,
        "series": list(entries.values()),
        "refused": refused,
    }
    (args.out / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n")
    slices = sum(e["slices_written"] for e in entries.values())
    print(
        f"{len(entries)} series, {slices} axial slices, {total / 2**20:.1f} MiB in {args.out}"
        + (f"; refused: {', '.join(refused)}" if refused else "")
    )
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
