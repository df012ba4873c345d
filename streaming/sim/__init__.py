"""Weight-streaming simulator: hardware profiles (conf/cluster/), an event model of the streaming
executor's step, GPU-cluster alternatives, calibration and traces.

    python -m crystal.streaming.sim model=crystalcoder_7b cluster=cg1        predicted step, memory, bottleneck
    python -m crystal.streaming.sim model=crystalcoder_7b cluster=h100 --trace step.json
    python -m crystal.streaming.sim sweep                                    CSV + PNG over models and CS-2 counts
    python -m crystal.streaming.sim gpu                                      FSDP / 3D parallel / streaming on H100s
    python -m crystal.streaming.sim calibrate --out conf/cluster/cpu.yaml   measure this machine

Imports nothing from crystal/ (layout rule); model shapes are read from conf/model/*.yaml.
"""

from crystal.streaming.sim.profile import ClusterProfile, RunDefaults, load_profile
from crystal.streaming.sim.shapes import ModelShape, load_shape
from crystal.streaming.sim.timing import Prediction, simulate

__all__ = ["ClusterProfile", "ModelShape", "Prediction", "RunDefaults", "load_profile", "load_shape", "simulate"]
