"""Draw the repository's pictures (run by hand after changing a template; the PNGs are committed):

* ``example_workflows/<name>.png``: a preview of each template, its graph as ComfyUI lays it out (node
  boxes at their saved positions, titles, widget values, links coloured by type);
* ``docs/images/overview.png``: the README's diagram of what the pack does;
* ``docs/images/icon.png``: the Comfy Registry icon (the 5-point keypoint image InstantID's IdentityNet reads).

``python tools/make_doc_images.py`` (needs pillow and opencv, as the pack does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instantid.comfy.other_packs import DISPLAY_NAMES  # noqa: E402
from instantid.keypoints import draw_kps  # noqa: E402

BACKGROUND, NODE, TITLE, TEXT, FRAME = (32, 32, 36), (53, 53, 58), (78, 78, 86), (225, 225, 225), (110, 110, 120)
LINK_COLOURS = {
    "MODEL": (180, 160, 255), "CLIP": (255, 214, 0), "VAE": (255, 100, 100), "CONDITIONING": (255, 160, 60),
    "LATENT": (255, 140, 200), "IMAGE": (100, 180, 255), "MASK": (120, 220, 120),
}  # fmt: skip
OTHER_LINK = (170, 170, 170)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def render_workflow(workflow: dict, scale: float = 1.0) -> Image.Image:
    """The graph of a UI-format workflow: boxes at ``pos`` of ``size``, links from output to input slots."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    left = min(n["pos"][0] for n in nodes.values()) - 30
    top = min(n["pos"][1] for n in nodes.values()) - 60
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 30
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 80
    image = Image.new("RGB", (int(right - left), int(bottom - top)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((16, 12), workflow.get("extra", {}).get("title", ""), fill=TEXT, font=font(20))

    def at(x: float, y: float) -> tuple[float, float]:
        return (x - left, y - top)

    def slot(node: dict, index: int, output: bool) -> tuple[float, float]:
        x = node["pos"][0] + (node["size"][0] if output else 0)
        return at(x, node["pos"][1] + 42 + 20 * index)

    for link in workflow.get("links", []):
        _, source, out_slot, target, in_slot, kind = link[:6]
        start, end = slot(nodes[source], out_slot, True), slot(nodes[target], in_slot, False)
        middle = ((start[0] + end[0]) / 2, start[1]), ((start[0] + end[0]) / 2, end[1])
        draw.line([start, middle[0], middle[1], end], fill=LINK_COLOURS.get(kind, OTHER_LINK), width=3)
    for node in nodes.values():
        x, y = at(*node["pos"])
        w, h = node["size"]
        draw.rounded_rectangle([x, y, x + w, y + h], radius=8, fill=NODE, outline=FRAME)
        draw.rounded_rectangle([x, y, x + w, y + 28], radius=8, fill=TITLE)
        draw.text((x + 10, y + 6), DISPLAY_NAMES.get(node["type"], node["type"]), fill=TEXT, font=font(15))
        values = [v for v in node.get("widgets_values") or [] if v not in ("fixed", "image")]
        for row, value in enumerate(values[:4]):
            text = str(value)
            text = text if len(text) <= 38 else text[:36] + "..."
            draw.text((x + 12, y + 40 + 20 * row), text, fill=TEXT, font=font(13))
    if scale != 1.0:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.LANCZOS)
    return image


def overview() -> Image.Image:
    """Reference photo -> face analysis -> Apply InstantID (identity attention + IdentityNet) -> KSampler."""
    image = Image.new("RGB", (1200, 360), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = [
        ("reference photo", "a face to keep", (40, 60)),
        ("InstantID Face Analysis", "antelopev2: embedding + 5 keypoints", (300, 60)),
        ("Apply InstantID", "identity attention on a clone\nof the SDXL model; the\nIdentityNet ControlNet on\nthe conditioning", (600, 60)),
        ("KSampler", "any prompt, any style", (920, 60)),
    ]
    for (title, text, (x, y)), nxt in zip(boxes, [*boxes[1:], None], strict=True):
        draw.rounded_rectangle([x, y, x + 240, y + 190], radius=10, fill=NODE, outline=FRAME)
        draw.rounded_rectangle([x, y, x + 240, y + 32], radius=10, fill=TITLE)
        draw.text((x + 10, y + 7), title, fill=TEXT, font=font(17))
        draw.multiline_text((x + 10, y + 44), text, fill=TEXT, font=font(14), spacing=6)
        if nxt:
            draw.line([(x + 240, y + 75), (nxt[2][0], y + 75)], fill=LINK_COLOURS["MODEL"], width=4)
    kps = draw_kps((120, 120), [[40, 45], [80, 45], [60, 68], [44, 90], [76, 90]]).resize((80, 80))
    image.paste(kps, (380, 160))
    draw.text(
        (40, 280),
        "The same identity in every image; every node after Apply InstantID (LoRA, RescaleCFG, a second face)\n"
        "clones the model in well under a millisecond instead of copying the adapter (copy-on-write clones).",
        fill=TEXT, font=font(16), spacing=8,
    )  # fmt: skip
    return image


def icon() -> Image.Image:
    points = [[62, 70], [118, 70], [90, 102], [68, 132], [112, 132]]
    return draw_kps((180, 180), points).resize((400, 400), Image.LANCZOS)


def main() -> None:
    (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        render_workflow(json.loads(path.read_text())).save(path.with_suffix(".png"), optimize=True)
        print(path.with_suffix(".png").relative_to(ROOT))
    overview().save(ROOT / "docs" / "images" / "overview.png", optimize=True)
    icon().save(ROOT / "docs" / "images" / "icon.png", optimize=True)
    print("docs/images/overview.png, docs/images/icon.png")


if __name__ == "__main__":
    main()
