"""Small ONNX face models in the layouts insightface routes on, and the test images they detect.

``build_antelopev2_like(root)`` writes ``root/models/antelopev2/{scrfd_10g_bnkps,glintr100}.onnx``: a
folder that the real ``insightface.app.FaceAnalysis`` loads like the published antelopev2 pack (same
file names, same graph interfaces), with small hand-set weights instead of the trained ones.

The detector (``scrfd_10g_bnkps.onnx``) has the SCRFD interface: one input ``1x3xHxW`` with dynamic
height and width, nine outputs (scores ``[N, 1]``, box distances ``[N, 4]``, keypoint distances
``[N, 10]`` at strides 8, 16 and 32, two anchors per position, in that order). It is not trained: it
detects *face tags*, saturated green squares that ``paste_face_tag`` draws on a photo, so a test
decides where faces are and how big they are:

* every pixel gets a tag value ``clip((min(G - R, G - B) - 1.2) / 0.792, 0, 1)`` on insightface's
  normalised input ((x - 127.5) / 128): 1 on pure green (0, 255, 0), 0 on any pixel whose green does
  not exceed both red and blue by more than ~153 levels, which holds on every photo insightface ships;
* at stride ``s``, a position's score is ``sigmoid(10 * (C - S - spill - 0.5))`` where ``C`` is the
  mean tag value over the ``s x s`` window centred on the anchor, ``S`` the mean over the ``3s x 3s``
  window (a centre-surround filter) and ``spill = 25 O - 9 S`` the tag area (in units of ``s^2``)
  between the ``3s`` and the ``5s`` window (``O``: mean over ``5s x 5s``), which silences anchors near
  a tag but not at its centre and strides too fine for it. A tag of side ``t`` (in detector pixels:
  image pixels times the detection size over the image's longer side, as insightface letterboxes)
  centred on an anchor (a multiple of ``s`` in detector pixels; elsewhere the box is off by up to
  ``s / 2``) scores ``C - S = 0.889 (t/s)^2`` for ``t <= s`` and ``1 - (t / 3s)^2`` for ``s <= t <= 3s``, so it is
  detected (score >= 0.5, insightface's threshold) for ``0.75 s <= t <= 2.12 s``: strides 8, 16, 32
  cover tags of about 6 to 68 detector pixels. A larger tag is "too close to the camera": it is found
  only once the detection size is small enough to shrink it under 68 pixels, which is how a test makes
  "no face at 640 x 640, found at a smaller size". ``largest_detectable_tag`` gives that limit.
* ``S`` measures the tag's area, ``t = 3 s sqrt(S)``; the box is the square of side ``3 t`` centred on
  the anchor (the tag marks the middle of a face three times its size), the five keypoints sit on an
  ArcFace-like template scaled to that box (eyes, nose, mouth corners, all inside the box).

The recognizer (``glintr100.onnx``) has the ArcFace interface insightface routes on (input
``1x3x112x112``, output ``[1, 512]``): a 14x14 average pool to 3x8x8 followed by a fixed random
linear map (seeded), so the embedding depends on the aligned crop's content, its raw norm is in the
tens like real antelopev2's, and a test can recompute it from the crop (``recognizer_weights``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
STRIDES = (8, 16, 32)
TAG_COLOR_RGB = (0, 255, 0)
FACE_PER_TAG = 3.0
"""A tag of side t marks a face box of side ``FACE_PER_TAG * t`` centred on it."""
OPSET = 17
IR_VERSION = 8

# Keypoints in units of the face box side, relative to its centre: left eye, right eye, nose,
# left and right mouth corners (image x to the right, y down), the proportions of ArcFace's template.
KPS_TEMPLATE = np.array(
    [[-0.2, -0.16], [0.2, -0.16], [0.0, 0.065], [-0.165, 0.3], [0.165, 0.3]], dtype=np.float32
)
_TAG_THRESHOLD = 1.2
_TAG_SCALE = 1.0 / 0.792
_SCORE_GAIN = 10.0
_SCORE_OFFSET = 0.5
_POOL_SIDE = 14

RecognizerKind = Literal["random", "zeros", "nan"]


def largest_detectable_tag(stride: int = STRIDES[-1]) -> float:
    """Side (detector pixels) above which a centred tag scores under 0.5 at ``stride``: C - S = 0.5."""
    return 3.0 * stride * float(np.sqrt(0.5))


def paste_face_tag(image: np.ndarray, center: tuple[int, int], side: int) -> np.ndarray:
    """Return a copy of the HxWx3 uint8 RGB ``image`` with a green square of ``side`` pixels centred
    on ``center`` (x, y): a face the detector above finds, with box side ``FACE_PER_TAG * side``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    out = image.copy()
    x, y = center
    half = side // 2
    out[max(y - half, 0) : y - half + side, max(x - half, 0) : x - half + side] = TAG_COLOR_RGB
    return out


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value)
    )


def _window_mean(
    feature: str, out: str, *, side: int, stride: int, before: int, after: int
) -> list[onnx.NodeProto]:
    """Mean of ``feature`` over a ``side x side`` window every ``stride`` pixels, zero padding counted (so
    the output grid is ``H / stride x W / stride`` with window ``i`` covering ``[i * stride - before,
    i * stride - before + side)``): rows then columns, ``2 * side`` additions per output, not ``side^2``."""
    return [
        helper.make_node(
            "AveragePool",
            [feature],
            [f"{out}_rows"],
            name=f"{out}_rows",
            kernel_shape=[side, 1],
            strides=[stride, 1],
            pads=[before, 0, after, 0],
            count_include_pad=1,
        ),
        helper.make_node(
            "AveragePool",
            [f"{out}_rows"],
            [out],
            name=out,
            kernel_shape=[1, side],
            strides=[1, stride],
            pads=[0, before, 0, after],
            count_include_pad=1,
        ),
    ]


def _detector_level(stride: int, feature: str) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    """Nodes computing one stride's score, box and keypoint outputs from the tag map ``feature``."""
    s = stride
    p = f"s{s}"
    nodes = [
        *_window_mean(feature, f"{p}_centre", side=s, stride=s, before=s // 2, after=0),
        *_window_mean(feature, f"{p}_surround", side=3 * s, stride=s, before=3 * s // 2, after=s),
        *_window_mean(feature, f"{p}_outer", side=5 * s, stride=s, before=5 * s // 2, after=2 * s),
        # Tag area between the 3s and the 5s window, in units of s^2: a tag reaching out of the
        # surround window is not centred here (or too big for this stride), so its score drops.
        helper.make_node("Mul", [f"{p}_outer", "outer_cells"], [f"{p}_outer_area"], name=f"{p}_outer_area"),
        helper.make_node(
            "Mul", [f"{p}_surround", "surround_cells"], [f"{p}_surround_area"], name=f"{p}_surround_area"
        ),
        helper.make_node("Sub", [f"{p}_outer_area", f"{p}_surround_area"], [f"{p}_spill"], name=f"{p}_spill"),
        helper.make_node("Sub", [f"{p}_centre", f"{p}_surround"], [f"{p}_contrast"], name=f"{p}_contrast"),
        helper.make_node("Sub", [f"{p}_contrast", f"{p}_spill"], [f"{p}_contained"], name=f"{p}_contained"),
        helper.make_node("Sub", [f"{p}_contained", "score_offset"], [f"{p}_shifted"], name=f"{p}_shift"),
        helper.make_node("Mul", [f"{p}_shifted", "score_gain"], [f"{p}_logit"], name=f"{p}_gain"),
        helper.make_node("Sigmoid", [f"{p}_logit"], [f"{p}_score_map"], name=f"{p}_sigmoid"),
        helper.make_node("Sqrt", [f"{p}_surround"], [f"{p}_extent_map"], name=f"{p}_extent"),
    ]
    columns = {}
    for what in ("score", "extent"):
        # [1, 1, h, w] -> [h*w, 1] -> two anchors per position -> [2*h*w, 1] (anchor index fastest).
        nodes += [
            helper.make_node(
                "Transpose",
                [f"{p}_{what}_map"],
                [f"{p}_{what}_nhwc"],
                name=f"{p}_{what}_t",
                perm=[0, 2, 3, 1],
            ),
            helper.make_node(
                "Reshape", [f"{p}_{what}_nhwc", "column"], [f"{p}_{what}_col"], name=f"{p}_{what}_r"
            ),
            helper.make_node(
                "Concat",
                [f"{p}_{what}_col", f"{p}_{what}_col"],
                [f"{p}_{what}_pair"],
                name=f"{p}_{what}_c",
                axis=1,
            ),
            helper.make_node(
                "Reshape", [f"{p}_{what}_pair", "column"], [f"{p}_{what}_anchors"], name=f"{p}_{what}_a"
            ),
        ]
        columns[what] = f"{p}_{what}_anchors"
    score, boxes, kps = f"score_{s}", f"bbox_{s}", f"kps_{s}"
    nodes += [
        helper.make_node("Identity", [columns["score"]], [score], name=f"{p}_score_out"),
        helper.make_node("Mul", [columns["extent"], "box_template"], [boxes], name=f"{p}_box_out"),
        helper.make_node("Mul", [columns["extent"], "kps_template"], [kps], name=f"{p}_kps_out"),
    ]
    return nodes, (score, boxes, kps)


def build_detector(keypoints: bool = True) -> onnx.ModelProto:
    """The SCRFD-layout tag detector described in the module docstring; without ``keypoints``, the
    six-output SCRFD variant (scores and boxes only)."""
    nodes, graph_outputs = _tag_detector(keypoints)
    graph = helper.make_graph(
        nodes,
        "scrfd_like_tag_detector",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        graph_outputs,
    )
    return _model(graph)


def _tag_detector(keypoints: bool = True) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """The tag detector's nodes (reading ``input.1``) and its graph outputs."""
    # Distances are in stride units (insightface multiplies by the stride). With t = 3 s sqrt(S) and the
    # face box side 3 t: half the box is 4.5 * FACE_PER_TAG / 3 * sqrt(S) strides; keypoints likewise.
    per_extent = 3.0 * FACE_PER_TAG
    box_template = np.full((1, 4), 0.5 * per_extent, dtype=np.float32)
    kps_template = (KPS_TEMPLATE.reshape(1, 10) * per_extent).astype(np.float32)
    channel_diff = np.array([[-1.0, 1.0, 0.0], [0.0, 1.0, -1.0]], dtype=np.float32).reshape(2, 3, 1, 1)
    nodes = [
        _const("channel_diff", channel_diff),
        _const("tag_threshold", np.array(_TAG_THRESHOLD, dtype=np.float32)),
        _const("tag_scale", np.array(_TAG_SCALE, dtype=np.float32)),
        _const("zero", np.array(0.0, dtype=np.float32)),
        _const("one", np.array(1.0, dtype=np.float32)),
        _const("score_offset", np.array(_SCORE_OFFSET, dtype=np.float32)),
        _const("score_gain", np.array(_SCORE_GAIN, dtype=np.float32)),
        _const("column", np.array([-1, 1], dtype=np.int64)),
        _const("outer_cells", np.array(25.0, dtype=np.float32)),
        _const("surround_cells", np.array(9.0, dtype=np.float32)),
        _const("box_template", box_template),
        _const("kps_template", kps_template),
        helper.make_node("Conv", ["input.1", "channel_diff"], ["green_excess"], name="green_excess"),
        helper.make_node(
            "ReduceMin", ["green_excess"], ["green_margin"], name="green_margin", axes=[1], keepdims=1
        ),
        helper.make_node("Sub", ["green_margin", "tag_threshold"], ["tag_raw"], name="tag_threshold"),
        helper.make_node("Mul", ["tag_raw", "tag_scale"], ["tag_scaled"], name="tag_scale"),
        helper.make_node("Clip", ["tag_scaled", "zero", "one"], ["tag"], name="tag_clip"),
    ]
    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        level_nodes, (score, boxes, kps) = _detector_level(stride, "tag")
        nodes += level_nodes
        outputs["score"].append(score)
        outputs["bbox"].append(boxes)
        outputs["kps"].append(kps)
    widths = {"score": 1, "bbox": 4, "kps": 10}
    graph_outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name.split('_')[1]}", widths[kind]])
        for kind in (("score", "bbox", "kps") if keypoints else ("score", "bbox"))
        for name in outputs[kind]
    ]
    return nodes, graph_outputs


def recognizer_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The recognizer's linear map ``[192, 512]`` and bias ``[512]`` for ``seed``."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((3 * 8 * 8, 512)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(512) * 0.1).astype(np.float32)
    return weight, bias


def build_recognizer(kind: RecognizerKind = "random", seed: int = 0) -> onnx.ModelProto:
    """The ArcFace-layout recognizer: 14x14 average pool, flatten, linear map to 512.

    ``kind="zeros"`` makes every embedding all zero and ``"nan"`` every embedding NaN (for testing the
    errors on such embeddings); ``"random"`` uses ``recognizer_weights(seed)``.
    """
    weight, bias = recognizer_weights(seed)
    if kind == "zeros":
        weight, bias = np.zeros_like(weight), np.zeros_like(bias)
    elif kind == "nan":
        bias = np.full_like(bias, np.nan)
    elif kind != "random":
        raise ValueError(f"recognizer kind must be 'random', 'zeros' or 'nan', got {kind!r}")
    nodes = [
        helper.make_node(
            "AveragePool",
            ["input.1"],
            ["pooled"],
            name="pool",
            kernel_shape=[_POOL_SIDE, _POOL_SIDE],
            strides=[_POOL_SIDE, _POOL_SIDE],
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "proj_weight"], ["projected"], name="proj"),
        helper.make_node("Add", ["projected", "proj_bias"], ["683"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_like_recognizer",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["batch", 512])],
        initializer=[
            numpy_helper.from_array(weight, "proj_weight"),
            numpy_helper.from_array(bias, "proj_bias"),
        ],
    )
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_antelopev2_like(root: Path, recognizer: RecognizerKind = "random", seed: int = 0) -> Path:
    """Write ``root/models/antelopev2`` with the two models above; return ``root`` (an insightface root:
    ``FaceAnalysis(name="antelopev2", root=root)`` and ``instantid.face.load_face_analysis(root)`` load it).
    """
    folder = Path(root) / "models" / "antelopev2"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_detector(), str(folder / DETECTOR_FILE))
    onnx.save(build_recognizer(recognizer, seed), str(folder / RECOGNIZER_FILE))
    return Path(root)


# --- real-cost stand-ins ---------------------------------------------------------------------------
#
# antelopev2's two models with their real architectures, input sizes and compute, and random weights, so
# that face-analysis timings are honest. Each adds its network's output, scaled by ``REAL_COST_MIX``, to
# the small stand-in's output above: detection and embeddings stay those of the tag detector and the
# pool-and-project recognizer (the tests' and benches' images still work), and onnxruntime must still
# run every convolution (nothing is constant, so nothing is folded away). Batch norms are left out: the
# published models' are folded into their convolutions by onnxruntime at load, so they cost nothing there.

REAL_COST_MIX = 1e-4
"""Scale of the real-architecture network's (bounded) output added to the small stand-in's output."""

SCRFD_10G: dict[str, Any] = {
    "stem": (28, 28, 56),
    "stage_blocks": (3, 4, 2, 3),
    "stage_planes": (56, 88, 88, 224),
    "neck": 56,
    "head": 80,
    "head_convs": 3,
    "anchors": 2,
}
"""SCRFD-10G-BNKPS (insightface ``scrfd_10g_bnkps.py``): ResNetV1e backbone with a deep stem and BasicBlocks,
PAFPN neck on strides 8, 16, 32, per-stride heads of three 3x3 convolutions, two anchors per position."""

IRESNET_100: dict[str, Any] = {
    "stem": 64,
    "layers": (3, 13, 30, 3),
    "planes": (64, 128, 256, 512),
    "embedding": 512,
}
"""iResNet-100 (insightface ``arcface_torch/backbones/iresnet.py``, glintr100): 112x112 input, IBasicBlocks."""


class _Net:
    """A tiny ONNX graph builder for convolutional networks, counting multiply-accumulates as it goes."""

    def __init__(self, prefix: str, seed: int, width: float) -> None:
        self.prefix = prefix
        self.rng = np.random.default_rng(seed)
        self.width = width
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.macs = 0
        self._count = 0

    def channels(self, c: int) -> int:
        return max(4, round(c * self.width))

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}{what}_{self._count}"

    def tensor(self, array: np.ndarray, what: str) -> str:
        name = self.name(what)
        dtype = np.int64 if array.dtype.kind in "iu" else np.float32
        self.initializers.append(numpy_helper.from_array(array.astype(dtype), name))
        return name

    def node(self, op: str, inputs: list[str], what: str, **attrs: Any) -> str:
        out = self.name(what)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(
        self,
        x: str,
        size: tuple[int, int],
        cin: int,
        cout: int,
        *,
        k: int = 3,
        stride: int = 1,
        act: str | None = "relu",
        gain: float = 1.0,
    ) -> tuple[str, tuple[int, int]]:
        """``k x k`` convolution (He-initialised, scaled by ``gain``) with bias, then ReLU / PReLU / nothing."""
        std = gain * np.sqrt(2.0 / (cin * k * k))
        weight = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(std)
        bias = np.zeros(cout, dtype=np.float32)
        out_size = (size[0] // stride, size[1] // stride)
        y = self.node(
            "Conv",
            [x, self.tensor(weight, "w"), self.tensor(bias, "b")],
            "conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
        )
        self.macs += out_size[0] * out_size[1] * cin * k * k * cout
        if act == "relu":
            y = self.node("Relu", [y], "relu")
        elif act == "prelu":
            y = self.node("PRelu", [y, self.tensor(np.full((cout, 1, 1), 0.25), "slope")], "prelu")
        return y, out_size


def _scrfd_basic_block(
    net: _Net, x: str, size: tuple[int, int], cin: int, cout: int, stride: int
) -> tuple[str, tuple[int, int]]:
    y, out = net.conv(x, size, cin, cout, stride=stride)
    y, _ = net.conv(y, out, cout, cout, act=None, gain=0.3)
    shortcut = x
    if stride != 1:
        shortcut = net.node(
            "AveragePool", [shortcut], "down", kernel_shape=[stride, stride], strides=[stride, stride]
        )
    if stride != 1 or cin != cout:
        shortcut, _ = net.conv(shortcut, out, cin, cout, k=1, act=None)
    return net.node("Relu", [net.node("Add", [y, shortcut], "add")], "relu"), out


def scrfd_10g_heads(net: _Net, x: str, size: tuple[int, int] = (640, 640)) -> dict[int, tuple[str, str, str]]:
    """SCRFD-10G's backbone, neck and heads on ``x`` (normalised ``1x3xHxW``): per stride the raw class,
    box and keypoint maps ``[1, 2 * (1 | 4 | 10), H / s, W / s]``. MACs are counted at ``size``."""
    cfg = SCRFD_10G
    c = net.channels
    stem = [c(w) for w in cfg["stem"]]
    y, hw = net.conv(x, size, 3, stem[0], stride=2)
    y, hw = net.conv(y, hw, stem[0], stem[1])
    y, hw = net.conv(y, hw, stem[1], stem[2])
    y = net.node("MaxPool", [y], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    hw = (hw[0] // 2, hw[1] // 2)
    cin = stem[2]
    features: list[tuple[str, tuple[int, int], int]] = []
    for stage, (blocks, planes) in enumerate(zip(cfg["stage_blocks"], cfg["stage_planes"], strict=True)):
        cout = c(planes)
        for b in range(blocks):
            y, hw = _scrfd_basic_block(net, y, hw, cin, cout, 2 if (b == 0 and stage > 0) else 1)
            cin = cout
        if stage > 0:
            features.append((y, hw, cout))
    neck = c(cfg["neck"])
    laterals = [net.conv(f, s, ch, neck, k=1, act=None) for f, s, ch in features]
    tops = [name for name, _ in laterals]
    scales = net.tensor(np.array([1.0, 1.0, 2.0, 2.0]), "scales")
    for i in (1, 0):  # top-down
        up = net.node("Resize", [tops[i + 1], "", scales], "up", mode="nearest")
        tops[i] = net.node("Add", [tops[i], up], "topdown")
    sizes = [s for _, s, _ in features]
    outs = [net.conv(t, s, neck, neck, act=None)[0] for t, s in zip(tops, sizes, strict=True)]
    for i in (1, 2):  # bottom-up (PAFPN)
        down, _ = net.conv(outs[i - 1], sizes[i], neck, neck, stride=2, act=None)
        outs[i] = net.conv(net.node("Add", [outs[i], down], "bottomup"), sizes[i], neck, neck, act=None)[0]
    head = c(cfg["head"])
    anchors = cfg["anchors"]
    result: dict[int, tuple[str, str, str]] = {}
    for stride, feature, s in zip(STRIDES, outs, sizes, strict=True):
        h, ch = feature, neck
        for _ in range(cfg["head_convs"]):
            h, _ = net.conv(h, s, ch, head)
            ch = head
        cls, box, kps = (net.conv(h, s, head, anchors * k, act=None, gain=0.5)[0] for k in (1, 4, 10))
        result[stride] = (cls, box, kps)
    return result


def _anchor_rows(net: _Net, x: str, width: int) -> str:
    """``[1, 2 * width, h, w]`` -> ``[2 * h * w, width]`` (anchor index fastest), as SCRFD's outputs are laid out."""
    t = net.node("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])
    return net.node("Reshape", [t, net.tensor(np.array([-1, width]), "shape")], "rows")


def build_real_cost_detector(width: float = 1.0, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The tag detector plus SCRFD-10G-BNKPS with random weights (``width`` scales every channel count; 1.0 is
    the real one): the same input (``1x3xHxW``, dynamic) and nine outputs as ``build_detector``, each output
    the tag detector's plus ``REAL_COST_MIX`` times the bounded SCRFD head. Returns the model and its
    multiply-accumulates at 640x640."""
    nodes, graph_outputs = _tag_detector(keypoints=True)
    finals = {v.name for v in graph_outputs}
    for node in nodes:
        for i, out in enumerate(node.output):
            if out in finals:
                node.output[i] = f"{out}_tag"
    net = _Net("rc_", seed, width)
    heads = scrfd_10g_heads(net, "input.1")
    mix = net.tensor(np.array(REAL_COST_MIX), "mix")
    for stride, raw in heads.items():
        for kind, k, squash, tensor in zip(
            ("score", "bbox", "kps"), (1, 4, 10), ("Sigmoid", "Tanh", "Tanh"), raw, strict=True
        ):
            bounded = net.node(squash, [_anchor_rows(net, tensor, k)], kind)
            scaled = net.node("Mul", [bounded, mix], "mixed")
            net.nodes.append(
                helper.make_node(
                    "Add", [f"{kind}_{stride}_tag", scaled], [f"{kind}_{stride}"], name=f"{kind}_{stride}_out"
                )
            )
    graph = helper.make_graph(
        nodes + net.nodes,
        "scrfd_10g_real_cost_detector",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        graph_outputs,
        initializer=net.initializers,
    )
    return _model(graph), net.macs


def iresnet_100_embedding(net: _Net, x: str) -> str:
    """iResNet-100 on ``x`` (``Nx3x112x112``): the ``[N, 512]`` feature, bounded by ``Tanh``."""
    cfg = IRESNET_100
    c = net.channels
    y, hw = net.conv(x, (112, 112), 3, c(cfg["stem"]), act="prelu")
    cin = c(cfg["stem"])
    for blocks, planes in zip(cfg["layers"], cfg["planes"], strict=True):
        cout = c(planes)
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            r, _ = net.conv(y, hw, cin, cout, act="prelu")  # BN-conv-BN-PReLU
            r, out = net.conv(r, hw, cout, cout, stride=stride, act=None, gain=0.3)  # conv-BN
            shortcut = y
            if stride != 1 or cin != cout:
                shortcut, _ = net.conv(y, hw, cin, cout, k=1, stride=stride, act=None)
            y, hw, cin = net.node("Add", [r, shortcut], "add"), out, cout
    flat = net.node("Flatten", [y], "flat", axis=1)
    features = cin * hw[0] * hw[1]
    fc = net.rng.standard_normal((features, cfg["embedding"]), dtype=np.float32) / np.float32(
        np.sqrt(features)
    )
    net.macs += features * cfg["embedding"]
    return net.node("Tanh", [net.node("MatMul", [flat, net.tensor(fc, "fc")], "fc")], "bounded")


def build_real_cost_recognizer(width: float = 1.0, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The pool-and-project recognizer plus iResNet-100 with random weights (``width`` scales the channels; 1.0
    is the real one): input ``Nx3x112x112``, output ``[N, 512]``, the small recognizer's embedding plus
    ``REAL_COST_MIX`` times the bounded iResNet feature. Returns the model and its multiply-accumulates per face.

    The first nodes hold no ``Sub``/``Mul`` (insightface reads the input normalisation from them)."""
    small = build_recognizer("random", seed)
    net = _Net("rc_", seed + 1, width)
    feature = iresnet_100_embedding(net, "input.1")
    scaled = net.node("Mul", [feature, net.tensor(np.array(REAL_COST_MIX), "mix")], "mixed")
    nodes = list(small.graph.node)
    output = nodes[-1].output[0]
    nodes[-1].output[0] = "small_embedding"
    final = helper.make_node("Add", ["small_embedding", scaled], [output], name="real_cost_out")
    graph = helper.make_graph(
        nodes + net.nodes + [final],
        "iresnet100_real_cost_recognizer",
        list(small.graph.input),
        list(small.graph.output),
        initializer=list(small.graph.initializer) + net.initializers,
    )
    return _model(graph), net.macs


REAL_COST_CACHE_ENV = "INSTANTID_FACE_MODELS_CACHE"
"""Folder for the built real-cost models (default: ``$XDG_CACHE_HOME/instantid/face_models``, i.e.
``~/.cache/instantid/face_models``); they are built once (~300 MB, a minute) and reused."""
REAL_COST_VERSION = 1
"""Bumped when the real-cost builders change, so a stale build is never reused."""


def real_cost_root(cache_dir: Path | None = None) -> Path:
    """An insightface root with the real-cost ``antelopev2`` stand-ins, built there on first use (outside git)."""
    import os

    if cache_dir is None:
        env = os.environ.get(REAL_COST_CACHE_ENV)
        base = (
            Path(env)
            if env
            else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instantid" / "face_models"
        )
        cache_dir = base / f"real_cost_v{REAL_COST_VERSION}"
    folder = Path(cache_dir) / "models" / "antelopev2"
    if not ((folder / DETECTOR_FILE).is_file() and (folder / RECOGNIZER_FILE).is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        for file, build in (
            (DETECTOR_FILE, build_real_cost_detector),
            (RECOGNIZER_FILE, build_real_cost_recognizer),
        ):
            model, _ = build()
            partial = folder / f"{file}.partial"
            onnx.save(model, str(partial))
            partial.replace(folder / file)  # complete files only: an interrupted build is redone
    return Path(cache_dir)
