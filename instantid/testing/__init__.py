"""Test fixtures shipped with the package, for this project's tests and benches (as ``diffusers.utils.testing_utils``).

Everything here builds inputs offline, from seeds: nothing is downloaded and no real weights are
needed. Each module has one job and imports its heavy dependencies (ComfyUI, diffusers, onnx)
itself, so importing this package costs nothing:

- ``adapter_files``: random InstantID adapter files in the published layouts.
- ``shapes``: the published SD1.5 / SDXL ``UNet2DConditionModel`` configs, built without weights.
- ``tiny_pipelines``: tiny random diffusers models and an SDXL ControlNet pipeline.
- ``face_models``: small ONNX face models in antelopev2's layout, and the face tags they detect.
- ``face_images``: insightface's photos, and crops with a face tag (or none) for that detector.
- ``comfyui``: a real ComfyUI imported in-process on CPU, and tiny ComfyUI models.
- ``absent_modules``: placeholders for torchvision / torchaudio while ComfyUI imports (stdlib only).
- ComfyUI server: ``comfy_install`` (a private base directory, this repository in its
  ``custom_nodes``), ``comfy_models`` (random-weight SD1.5 checkpoint, ControlNets, adapters, LoRA),
  ``comfy_fixture.prepare_install`` (all of it in one call, with test images),
  ``comfy_launcher`` (the server's entry script), ``comfy_server`` (start / drive over HTTP and the
  websocket / stop), ``workflows`` (UI-format workflows to API graphs).

Dependencies point one way: ``bench`` and ``tests`` import this package, never the reverse.
"""
