"""The evaluation report as a table, for `icmd_auto evaluate` and `icmd_auto demo`."""

from __future__ import annotations


def format_report(report: dict) -> str:
    mean = report["mean"]
    rows = [
        f"x{report['factor']}, {report['num_cases']} case(s)",
        f"{'method':<10}{'PSNR all':>10}{'PSNR syn':>10}{'SSIM_a':>9}{'SSIM_c':>9}{'SSIM_s':>9}",
    ]
    for method in ("icmd", "linear", "cubic", "nearest"):
        if method in mean:
            m = mean[method]
            rows.append(
                f"{method:<10}{m['psnr_all']:>10.2f}{m['psnr_syn']:>10.2f}{m['ssim_a']:>9.4f}"
                f"{m['ssim_c']:>9.4f}{m['ssim_s']:>9.4f}"
            )
    if "gain_over_linear_psnr_syn" in mean:
        rows.append(f"gain over linear (synthesized slices): {mean['gain_over_linear_psnr_syn']:+.2f} dB")
    return "\n".join(rows)
