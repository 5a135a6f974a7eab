"""Test fixtures shipped with the package, for this project's tests and benches (as ``diffusers.utils.testing_utils``).

Everything here builds inputs offline, from seeds: nothing is downloaded and no real weights are
needed. Each module has one job and imports its heavy dependencies (ComfyUI, diffusers, onnx)
itself, so importing this package costs nothing:

- ``adapter_files``: random InstantID adapter files in the published layouts.
- ``shapes``: the published SD1.5 / SDXL ``UNet2DConditionModel`` configs, built without weights.
- ``tiny_pipelines``: tiny random diffusers models and an SDXL ControlNet pipeline.
- ``face_models``: small ONNX face models in antelopev2's layout, and the face tags they detect.
- ``comfyui``: a real ComfyUI imported in-process on CPU, and tiny ComfyUI models.

Dependencies point one way: ``bench`` and ``tests`` import this package, never the reverse.
"""
