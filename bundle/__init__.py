"""The ICMD MONAI bundle template (importable as icmd_auto.bundle_template when installed)."""
