"""Weight-streaming simulator: hardware profiles (conf/cluster/), an event model of the streaming
executor's step, GPU-cluster alternatives, calibration and traces.

    python -m streaming.sim model=crystalcoder_7b cluster=cg1        predicted step, memory, bottleneck
    python -m streaming.sim model=crystalcoder_7b cluster=h100 --trace step.json
    python -m streaming.sim sweep                                    CSV + PNG over models and CS-2 counts
    python -m streaming.sim gpu                                      FSDP / 3D parallel / streaming on H100s
    python -m streaming.sim calibrate --out conf/cluster/cpu.yaml   measure this machine

Imports nothing from crystal/ (layout rule); model shapes are read from conf/model/*.yaml.
"""

from streaming.sim.profile import ClusterProfile, RunDefaults, load_profile
from streaming.sim.shapes import ModelShape, load_shape
from streaming.sim.timing import Prediction, simulate

__all__ = ["ClusterProfile", "ModelShape", "Prediction", "RunDefaults", "load_profile", "load_shape", "simulate"]
