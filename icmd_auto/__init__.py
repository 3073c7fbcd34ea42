"""ICMD-Auto: self-supervised CT slice synthesis with an nnU-Net-style planner and a MONAI bundle.

The flow is one-directional, one module per step (as nnU-Net's experiment planning):

    dataset.py      read dataset.json (MSD / nnU-Net form)
    integrity.py    fail early: every file exists, is a readable 3-D single-channel CT
    fingerprint.py  facts about the data, no decisions        -> fingerprint.json
    planner.py      decisions from facts, each with a reason  -> plans.json
                    (from plan_measurements.py: probes on this machine, and plan_memory.py:
                    the memory model)
    bundle_writer.py the plan written into a MONAI bundle      -> <work>/bundle/
    runner.py       train / predict / evaluate through monai.bundle
    predict.py      prediction of one volume or a batch of them
    api.py          the Python API; cli.py is the `icmd_auto` command on top of it

The method itself (networks, losses, schedule) lives once, in the bundle template's
``scripts/`` package (``bundle/`` in the source tree, ``icmd_auto.bundle_template`` when installed).
"""

__version__ = "0.1.0"
