"""The synthetic visual world: rendered scenes whose every fact is known, a raw pool with injected
defects, instruction data, and the eight benchmarks in their official layouts (``bunny synth``)."""

from bunny.data.synthetic.bench import TASKS
from bunny.data.synthetic.scenes import Obj, Scene, render, sample_scene
from bunny.data.synthetic.world import World, WorldConfig, generate_world

__all__ = ["TASKS", "Obj", "Scene", "World", "WorldConfig", "generate_world", "render", "sample_scene"]
