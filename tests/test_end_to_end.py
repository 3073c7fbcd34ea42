"""The method end to end on real CT: plan, train briefly, and beat linear interpolation."""

from __future__ import annotations

from conftest import CHEST, requires_shared_data, thicken, write_dataset

from icmd_auto import api


@requires_shared_data
def test_brief_training_beats_linear_interpolation_on_the_synthesized_slices(tmp_path):
    """The chest thickened x4 (every 4th slice kept), the default recipe on the tiny preset for 40
    iterations, then the simulated-thick evaluation on the thin chest: the synthesized slices beat
    linear interpolation (measured: +0.16 dB). An untrained network is linear interpolation, so
    a broken loss, optimiser, pair maker or checkpoint leaves the gain at or below zero."""
    thick = thicken(CHEST, tmp_path / "chest_x4.nii.gz", 4)
    dataset = write_dataset(tmp_path / "dataset.json", [thick], test=[CHEST])
    api.plan(dataset, tmp_path / "work", factor=4, preset="tiny", epochs=2)
    api.train(tmp_path / "work", quiet=True, iterations_per_epoch=20)
    report = api.evaluate(tmp_path / "work", dataset, quiet=True)
    gain = report["mean"]["icmd"]["psnr_syn"] - report["mean"]["linear"]["psnr_syn"]
    assert gain > 0.05, f"{gain:+.3f} dB over linear interpolation on the synthesized slices"
