"""The built-in synthetic person world (DESIGN.md section 4): pedestrians with ground truth, in real layouts.

Public entry points:

- ``SynthConfig`` / ``write_world(cfg, out)``: ``clasp synth`` (LUPerson folder + LMDB, Market-1501,
  PA-100K, ground-truth Parquet, caption pairs, preview);
- ``random_look(rng)``, ``make_camera(seed, index)``, ``render_person(rng, look, camera, height, width)``:
  in-memory rendering (RGB, part mask, COCO keypoints) for benchmarks and tests;
- ``attributes(look, view)`` / ``caption(look, view)``: the PA-100K attribute vector and sentence of a person.
"""

from pipeline.synth.look import ATTRIBUTES, VIEW_DEPENDENT, Look, attributes, caption, random_look
from pipeline.synth.render import Sample, Shot, random_shot, render_person, render_shot
from pipeline.synth.scene import Camera, make_camera
from pipeline.synth.world import SynthConfig, write_world

__all__ = [
    "ATTRIBUTES",
    "VIEW_DEPENDENT",
    "Camera",
    "Look",
    "Sample",
    "Shot",
    "SynthConfig",
    "attributes",
    "caption",
    "make_camera",
    "random_look",
    "random_shot",
    "render_person",
    "render_shot",
    "write_world",
]
