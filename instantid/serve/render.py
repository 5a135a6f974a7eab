"""One generation: a validated request and an identity's pipeline -> PNG bytes, within a deadline.

The pipeline is called as diffusers pipelines are (prompt, steps, guidance, size, a seeded CPU
generator, so a seed gives the same image on any replica and device); a ControlNet pipeline
also gets the identity's keypoint image and ``identitynet_strength``. The deadline is checked
after every denoising step (diffusers' ``callback_on_step_end``): past it, the generation
stops and :class:`~instantid.serve.errors.DeadlineExceeded` is raised.
"""

from __future__ import annotations

import inspect
import io
import time
from typing import Any

import torch

from instantid.serve.errors import DeadlineExceeded, Unprocessable
from instantid.serve.identities import place_kps
from instantid.serve.inputs import GenerateRequest
from instantid.serve.store import IdentityRecord

__all__ = ["image_size", "render_png"]

SIZE_MULTIPLE = 8


def image_size(pipe: Any, request: GenerateRequest, max_side: int) -> tuple[int, int]:
    """``(width, height)`` of the request, the pipeline's default size where not given;
    ``Unprocessable`` unless both are multiples of 8 and at most ``max_side``."""
    default = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    width, height = request.width or default, request.height or default
    for name, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or value > max_side:
            raise Unprocessable(f"{name} {value}: expected a multiple of {SIZE_MULTIPLE} of at most {max_side}")
    return width, height


def _stop_at(deadline: float) -> Any:
    def callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"the request's time limit passed after {step + 1} denoising steps")
        return callback_kwargs

    return callback


def render_png(
    pipe: Any, record: IdentityRecord, request: GenerateRequest, *, steps: int, size: tuple[int, int], deadline: float
) -> bytes:
    """Generate one image for ``request`` with ``pipe`` (an identity's view) and return it as PNG."""
    from instantid.keypoints import draw_kps

    if time.monotonic() > deadline:
        raise DeadlineExceeded("the request's time limit passed before its generation started")
    width, height = size
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": steps,
        "guidance_scale": request.guidance_scale,
        "width": width,
        "height": height,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
        "output_type": "pil",
    }
    if getattr(pipe, "controlnet", None) is not None:
        kwargs["image"] = draw_kps((width, height), place_kps(record, width, height))
        kwargs["controlnet_conditioning_scale"] = request.identitynet_strength
    if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        kwargs["callback_on_step_end"] = _stop_at(deadline)
    with torch.inference_mode():
        image = pipe(**kwargs).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
