"""The layer catalog: every capturable layer of a CNN, by kind, in execution order.

Built on torch.fx (torchvision's NodePathTracer, with timm's leaf modules), so a
layer is a graph node and a functional ``F.relu`` or a ReLU module applied three
times counts once per application, as the papers count them (ResNet-50: 49
activations, Inception-v3: 94, VGG-16: 15).

Kinds, listed here in execution order:
- ``pixels``: the model's preprocessed input, flattened: the layer named ``pixels``, the
  tensor the model receives (NAACL's "correlation at the pixel level only"). Inception-v3
  built with ``transform_input=True`` (torchvision's pretrained one) re-normalises it
  inside forward: ``pixels`` is the input before that, normalised with the zoo's
  ImageNet mean and std;
- ``activations``: every ReLU/ReLU6/SiLU/GELU/Hardswish application;
- ``concat``: every channel concatenation (Inception's block outputs, the
  concatenations inside InceptionE, and the one of ``transform_input``);
- ``mixed``: the concatenations that are an Inception block's output, Keras'
  ``mixed0``..``mixed10`` (torchvision's Inception-v3: the 11 ``Mixed_*`` modules; GoogLeNet: its 9);
- ``blocks``: outputs of residual / inverted-residual / Inception / fractal blocks;
- ``pool``: global pooled features outside the blocks (the classifier's input);
- ``logits``: the model's output;
- ``softmax``: the softmax of the model's output (Keras VGG-16's ``predictions``
  layer), a node computed after the model, named ``softmax``;
- ``deepest`` (FractalNet only): the layers Dharmaretnam et al. (2021, Section 5.1) analysed,
  all in the deepest column: "the first convolutional layer, the end of every second block,
  and the last fully connected layer". Read as, for the 5-block network (see
  :meth:`LayerCatalog.deepest`): the output of the deepest column's first conv unit in block 1
  (``blocks.0.columns.2.0.relu``), the output of its last conv unit in blocks 2 and 4
  (``blocks.1.columns.2.3.relu``, ``blocks.3.columns.2.3.relu``), and the classifier (``fc``);
- or explicit node names (``layer1.0.relu_2``) or module names (``layer1.0``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from semprobe.actors.fractalnet import FractalBlock, FractalNet
from semprobe.analysis.architecture import OpGraph
from semprobe.analysis.errors import InputError
from semprobe.analysis.similarity import zscore_rows

if TYPE_CHECKING:
    from torchvision.models.feature_extraction import NodePathTracer

# timm and torchvision (5 s of imports on top of torch's) are imported on first use: a Ray worker that only
# reads Layer records (a Gram or 2 vs. 2 task) never pays for them; tracing a model does.

TOKENS = ("all", "class")  # how a transformer's token sequence (tokens, features) is flattened: see select()
LAYER_KINDS = ("pixels", "activations", "concat", "mixed", "blocks", "pool", "logits", "softmax", "deepest")

PIXELS = "pixels"  # the name of the input layer (the graph's placeholder)

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)
ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    F.mish,
}
ACTIVATION_METHODS = {"relu", "relu_"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, torch.mean}
POOL_METHODS = {"mean"}


@functools.cache
def pool_modules() -> tuple[type[nn.Module], ...]:
    """The modules whose output is a pooled feature map (a global pool outside the blocks is kind ``pool``)."""
    import timm.layers

    return (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, timm.layers.SelectAdaptivePool2d)


@functools.cache
def inception_modules() -> tuple[type[nn.Module], ...]:
    """torchvision's and timm's Inception blocks: the output of one is kind ``mixed``."""
    # timm.models.inception_v3 is also the name of a function, which shadows the module as an attribute
    timm_inception = importlib.import_module("timm.models.inception_v3")
    tv_googlenet = importlib.import_module("torchvision.models.googlenet")  # likewise
    tv_inception = importlib.import_module("torchvision.models.inception")
    return (
        tv_inception.InceptionA,
        tv_inception.InceptionB,
        tv_inception.InceptionC,
        tv_inception.InceptionD,
        tv_inception.InceptionE,
        timm_inception.InceptionA,
        timm_inception.InceptionB,
        timm_inception.InceptionC,
        timm_inception.InceptionD,
        timm_inception.InceptionE,
        tv_googlenet.Inception,
    )


@functools.cache
def block_modules() -> tuple[type[nn.Module], ...]:
    """The block classes of torchvision, timm and semprobe that :func:`block_paths` falls back on."""
    import timm.models._efficientnet_blocks as timm_blocks
    import timm.models.resnet as timm_resnet
    import torchvision.models.efficientnet as tv_efficientnet
    import torchvision.models.mobilenetv2 as tv_mobilenetv2
    import torchvision.models.mobilenetv3 as tv_mobilenetv3
    import torchvision.models.resnet as tv_resnet

    return (
        tv_resnet.BasicBlock,
        tv_resnet.Bottleneck,
        tv_mobilenetv2.InvertedResidual,
        tv_mobilenetv3.InvertedResidual,
        tv_efficientnet.MBConv,
        tv_efficientnet.FusedMBConv,
        *inception_modules(),
        timm_resnet.BasicBlock,
        timm_resnet.Bottleneck,
        timm_blocks.DepthwiseSeparableConv,
        timm_blocks.InvertedResidual,
        timm_blocks.EdgeResidual,
        timm_blocks.CondConvResidual,
        FractalBlock,
    )


BODY_CONTAINERS = ("blocks", "stages", "layers", "features")  # where networks keep their repeated units


def _weights(m: nn.Module) -> int:
    """How many weight matrices or kernels (parameters of two or more dimensions) ``m`` holds: a conv or linear
    layer has one, a block at least two (norms and biases are vectors)."""
    return sum(p.ndim >= 2 for p in m.parameters())


def _blocks_in(module: nn.Module, path: str) -> list[str]:
    """The blocks among ``module``'s children, descending through stages (see :func:`block_paths`)."""
    found = []
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        found += _unit(child, where)
    return found


def _unit(m: nn.Module, path: str) -> list[str]:
    """``m`` as blocks: itself when it is one, the blocks inside it when it is a stage, none when it is a single
    layer (a stem or head conv, a downsampling step, a norm)."""
    if isinstance(m, block_modules()):
        return [path]
    if _weights(m) < 2:
        return []
    heavy = [c for c in m.children() if _weights(c) >= 2]
    # A stage: a plain sequence; a module whose one heavy child is a sequence (ConvNeXt's and Swin's stages: a
    # downsampling layer, then their `blocks`) or holds all its weights (timm's RegStage of one block); or
    # repeated units of one class (RegStage's b1..bn). A block has units of several kinds (attention and MLP) or
    # weights of its own beside its one heavy child (ConvNeXt's depthwise conv beside its MLP).
    sequences = (nn.Sequential, nn.ModuleList)
    stage = (
        isinstance(m, sequences)
        or (len(heavy) == 1 and (isinstance(heavy[0], sequences) or _weights(heavy[0]) == _weights(m)))
        or (len(heavy) >= 2 and len({type(c) for c in heavy}) == 1)
    )
    inner = _blocks_in(m, path) if stage else []
    # A "stage" with no block inside is itself the unit, unless it is a bare sequence (torchvision's ConvNeXt
    # block keeps its layers in one): then the module holding it is.
    return inner or ([] if isinstance(m, sequences) else [path])


def _feature_info_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The blocks of the body timm's ``feature_info`` marks: the children of the modules' common parent from the
    first named one to the last (feature_info names only the stages where the resolution drops: Inception-v3's
    Mixed_5d, Mixed_6e, Mixed_7c of its 11 blocks), each taken as a unit."""
    info = getattr(model, "feature_info", None)
    named = [f.get("module") for f in info if f.get("module") in modules] if isinstance(info, list) else []
    if not named:
        return []
    parts = [p.split(".") for p in named]
    depth = next((i for i in range(min(map(len, parts))) if len({q[i] for q in parts}) > 1), min(map(len, parts)))
    depth = min(depth, min(map(len, parts)) - 1)  # the parent of the named modules, not one of them
    parent = ".".join(parts[0][:depth])
    children = list(modules[parent].named_children())
    names = [name for name, _ in children]
    marked = [names.index(q[depth]) for q in parts if q[depth] in names]
    return [
        b
        for name, child in children[min(marked) : max(marked) + 1]
        for b in _unit(child, f"{parent}.{name}" if parent else name)
    ]


def block_paths(model: nn.Module) -> list[str]:
    """The module paths of a model's blocks, in definition order: its repeated residual (or transformer) units.

    Found generically, in this order:

    1. the children of the model's outermost ``blocks`` / ``stages`` / ``layers`` / ``features`` containers
       (timm's ViT, DeiT, ConvNeXt, Swin, EfficientNet, MobileNet; torchvision's ``encoder.layers`` of ViT,
       ``features`` of EfficientNet, MobileNet, ConvNeXt, Swin);
    2. else the modules of the body timm's ``feature_info`` marks (its stage outputs, e.g. RegNet's ``s1``..``s4``):
       the children of their parent from the first marked to the last;
    3. else every module of the fixed list :func:`block_modules` (torchvision's ResNet, Inception, GoogLeNet).

    In 1 and 2 a stage is descended into (see :func:`_unit`); a child with fewer than two weight tensors is a
    single layer, not a block (a stem, a downsampling step, a final 1x1 conv); a module of :func:`block_modules` is a
    block wherever it is met.
    """
    modules = dict(model.named_modules())
    containers = [p for p in modules if p.rpartition(".")[2] in BODY_CONTAINERS]
    outer = [p for p in containers if not any(p.startswith(c + ".") for c in containers)]
    found = [b for p in outer for b in _blocks_in(modules[p], p)]
    if not found:
        found = _feature_info_blocks(model, modules)
    if not found:
        found = [p for p, m in modules.items() if isinstance(m, block_modules())]
    return found


@dataclass(frozen=True)
class Layer:
    """One capturable layer: its node name, position among the chosen layers, kind and per-image shape."""

    name: str
    layer_index: int
    kind: str
    shape: tuple[int, ...]  # as captured: with ``token``, one token's features
    token: int | None = None  # a token sequence's row kept (0: the class token); None: the whole output

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


def _tracer() -> NodePathTracer:
    import timm.layers
    import torchvision
    from torchvision.models import feature_extraction

    leaves = [m for _, m in vars(torchvision.ops).items() if isinstance(m, type) and issubclass(m, nn.Module)]
    return feature_extraction.NodePathTracer(
        autowrap_modules=(math, torchvision.ops),
        autowrap_functions=tuple(f for f in timm.layers.get_notrace_functions() if callable(f)),
        leaf_modules=leaves + list(timm.layers.get_notrace_modules()),
    )


def _optional_arguments(model: nn.Module) -> dict[str, object]:
    """The model's forward arguments after the image that have defaults, traced at those defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _is_activation_module(m: nn.Module) -> bool:
    # timm's norm+act layers are traced as one leaf: their output is the activation's.
    return isinstance(m, ACTIVATION_MODULES) or isinstance(getattr(m, "act", None), ACTIVATION_MODULES)


class LayerCatalog:
    """All capturable layers of a model, found by tracing it once in eval mode.

    Parameters
    ----------
    model : nn.Module
        Put in eval mode; not otherwise changed.
    input_size : int
        Side of the square RGB input, used to record each layer's output shape.
    """

    def __init__(self, model: nn.Module, input_size: int):
        model.eval()
        tracer = _tracer()
        graph = tracer.trace(model, concrete_args=_optional_arguments(model))
        self.module = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        self.architecture = type(model).__name__
        # The input is the first node in execution order; it takes one name whatever forward calls it. Optional
        # arguments traced at their defaults (timm ViT's attn_mask) stay placeholders with a default: no layers.
        first = next((node for node in graph.nodes if node.op == "placeholder"), None)
        self._qualname = {
            node: PIXELS if node is first else tracer.node_to_qualname[node]
            for node in graph.nodes
            if node in tracer.node_to_qualname and (node.op != "placeholder" or node is first)
        }
        inputs = sum(node.op == "placeholder" and not node.args for node in graph.nodes)
        if inputs != 1 or PIXELS not in self._qualname.values():
            raise InputError(f"cannot catalog {model.__class__.__name__}: its forward takes {inputs} inputs, not one")
        self._node = {q: n for n, q in self._qualname.items()}
        device = next(model.parameters(), torch.empty(0)).device  # the model's own: a GPU's, or "meta" (shapes only)
        with torch.no_grad():
            ShapeProp(self.module).propagate(torch.zeros(1, 3, input_size, input_size, device=device))
        output = next(n for n in self.module.graph.nodes if n.op == "output")
        self._logits = _first_node(output.args[0])
        # computed after the model: no node of it, so a name no node has
        self._softmax = next(n for n in ("softmax", "softmax_of_logits", "softmax_") if n not in self._node)
        self.kinds = self._classify(model)
        # timm's ViT/DeiT (cls_token) and torchvision's (class_token) put the class token first in the sequence
        self.class_token = any(getattr(model, a, None) is not None for a in ("cls_token", "class_token"))

    def _shape(self, node: fx.Node | None) -> tuple[int, ...] | None:
        node = self._logits if node is None else node  # the softmax has the logits' shape
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None

    def _classify(self, model: nn.Module) -> dict[str, list[str]]:
        modules = dict(model.named_modules())
        blocks = block_paths(model)
        kinds: dict[str, list[str]] = {k: [] for k in LAYER_KINDS if k != "deepest"}
        block_outputs = {self._module_output(path) for path in blocks}
        inception_outputs = {
            self._module_output(path) for path, m in modules.items() if isinstance(m, inception_modules())
        }
        for node, qual in self._qualname.items():
            shape = self._shape(node)
            if shape is None:
                continue
            target = node.target
            if node.op == "call_module":
                m = modules[target]
                is_act, is_pool = _is_activation_module(m), isinstance(m, pool_modules())
            elif node.op == "call_function":
                is_act, is_pool = target in ACTIVATION_FUNCTIONS, target in POOL_FUNCTIONS
            elif node.op == "call_method":
                is_act, is_pool = target in ACTIVATION_METHODS, target in POOL_METHODS
            else:
                if node.op == "placeholder":
                    kinds["pixels"].append(qual)
                continue
            if is_act:
                kinds["activations"].append(qual)
            if node.op == "call_function" and target in CONCAT_FUNCTIONS:
                kinds["concat"].append(qual)
                if qual in inception_outputs:
                    kinds["mixed"].append(qual)
            if is_pool and math.prod(shape) == shape[0] and not any(qual.startswith(b + ".") for b in blocks):
                kinds["pool"].append(qual)
            if qual in block_outputs:
                kinds["blocks"].append(qual)
        kinds["logits"] = [self._qualname[self._logits]]
        kinds["softmax"] = [self._softmax]
        if isinstance(model, FractalNet):
            kinds["deepest"] = self.deepest(model) + kinds["logits"]
        return kinds

    def deepest(self, model: FractalNet) -> list[str]:
        """The convolutional layers of ``deepest``: the deepest column's first conv unit in the first block and
        its last conv unit in every second block (the 2nd, 4th, ...), each unit's output (its ReLU).

        Why these nodes. The deepest column (``columns[C-1]``, ``2**(C-1)`` units per block) is the only path
        that runs through every conv unit depth of the network; the joins average all columns, so a join is no
        layer of the deepest column alone, and its last unit's output, before the join and the max-pool, is where
        the column ends a block. "Every second block" is read as blocks 2 and 4 of 5, as "every second day"
        starts on the second: with the first unit and the classifier the four layers spread evenly along the
        deepest path (conv units 1, 8 and 16 of its 20, then the classifier), where blocks 1, 3 and 5 would put
        a block's end three units after the first layer and another right before the classifier. Each chosen node is a
        unit's output, after its batch norm and ReLU, as the paper's "layer" is the unit as a whole.
        """
        deepest = model.n_columns - 1
        units = [f"blocks.0.columns.{deepest}.0"] + [
            f"blocks.{i}.columns.{deepest}.{len(block.columns[deepest]) - 1}"
            for i, block in enumerate(model.blocks)
            if i % 2 == 1
        ]
        return [self._module_output(unit) for unit in units]

    def _module_output(self, path: str) -> str | None:
        """The last node executed inside a module: its output."""
        inside = [q for q in self._qualname.values() if q == path or q.startswith(path + ".")]
        return inside[-1] if inside else None

    def names(self) -> list[str]:
        """Every layer name, in execution order: the nodes, then the softmax computed after them."""
        return [*self._qualname.values(), self._softmax]

    def graph(self) -> OpGraph:
        """The traced operations in execution order, named as layers are, with the data edges between them; the
        softmax follows the logits (for the architecture diagram)."""
        nodes = list(self._qualname)
        index = {node: i for i, node in enumerate(nodes)}
        modules = dict(self.module.named_modules())
        ops = [
            type(modules[n.target]).__name__
            if n.op == "call_module"
            else "input"
            if n.op == "placeholder"
            else getattr(n.target, "__name__", str(n.target))
            for n in nodes
        ]
        edges = [(index[a], i) for i, n in enumerate(nodes) for a in n.all_input_nodes if a in index]
        return OpGraph(
            (*self._qualname.values(), self._softmax),
            (*ops, "softmax"),
            (*edges, (index[self._logits], len(nodes))),
        )

    def select(self, spec: str | Sequence[str], tokens: str = "all") -> list[Layer]:
        """Resolve a layer spec: comma-separated kinds and/or node or module names.

        Returns the union in execution order, numbered ``layer_index`` 0..n-1.

        ``tokens``: how a layer whose output is a token sequence, (tokens, features) per image in a model with
        a class token (a ViT block's), is flattened: ``all`` tokens, token-major (row t holds token t's
        features; the class token first), or only the ``class`` token's features. Other layers (CNN feature
        maps, logits) are flattened whole either way.
        """
        if tokens not in TOKENS:
            raise InputError(f"unknown token flattening '{tokens}': choose one of {', '.join(TOKENS)}")
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        chosen: dict[str, str] = {}
        for item in filter(None, items):
            if item == "deepest" and item not in self.kinds:
                raise InputError(
                    f"layer kind 'deepest' (the deepest column of Dharmaretnam et al.'s FractalNet analysis) needs a "
                    f"FractalNet, not {self.architecture}: choose kinds "
                    f"{', '.join(k for k in LAYER_KINDS if k != 'deepest')} or node names"
                )
            if item in self.kinds:
                chosen.update((q, item) for q in self.kinds[item] if q not in chosen)
            elif item == self._softmax:
                chosen.setdefault(item, "softmax")
            elif item in self._node and self._shape(self._node[item]) is not None:
                chosen.setdefault(item, "node")
            elif (out := self._module_output(item)) is not None and self._shape(self._node[out]) is not None:
                chosen.setdefault(out, "node")
            else:
                near = difflib.get_close_matches(item, self.names(), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise InputError(f"unknown layer '{item}': choose kinds {', '.join(LAYER_KINDS)} or a node name{hint}")
        if not chosen:
            raise InputError(
                f"layer spec '{spec}' selects no layers: choose kinds {', '.join(LAYER_KINDS)} or node names"
            )
        order = {q: i for i, q in enumerate(self.names())}
        names = sorted(chosen, key=order.__getitem__)
        layers = [Layer(q, i, chosen[q], self._shape(self._node.get(q))) for i, q in enumerate(names)]
        if tokens == "all":
            return layers
        sequences = [layer for layer in layers if len(layer.shape) == 2]
        if sequences and not self.class_token:
            raise InputError(
                f"--tokens class: {self.architecture} has no class token (layer {sequences[0].name} is a sequence "
                f"{sequences[0].shape}); choose --tokens all"
            )
        return [
            dataclasses.replace(layer, shape=layer.shape[1:], token=0) if layer in sequences else layer
            for layer in layers
        ]

    def capture_module(self, layers: Sequence[Layer], dtype: torch.dtype = torch.float32) -> fx.GraphModule:
        """A copy of the traced model whose forward returns ``(logits, [z-scored rows per layer])``.

        Each chosen node's output is z-scored into a fresh (batch, dim) tensor right
        after the node runs, before any later in-place op (ReLU(inplace=True), ``+=``)
        can overwrite it; the input (``pixels``) right after it is received. The softmax
        is a node added after the model's last: the model itself is not changed.
        """
        graph = fx.Graph()
        copied: dict[fx.Node, fx.Node] = {}
        logits = _first_node(graph.graph_copy(self.module.graph, copied))
        captures = []
        for layer in layers:
            if layer.name == self._softmax:
                node = graph.call_function(torch.softmax, (logits,), {"dim": 1})  # appended: after every node
            else:
                node = copied[self._node[layer.name]]
            if layer.token is not None:  # one token's row, taken before any later in-place op too
                with graph.inserting_after(node):
                    node = graph.call_function(operator.getitem, (node, (slice(None), layer.token)))
            with graph.inserting_after(node):
                captures.append(graph.call_function(zscore_rows, (node,), {"out_dtype": dtype}))
        graph.output((logits, tuple(captures)))
        graph.lint()
        return fx.GraphModule(self.module, graph, self.module.__class__.__name__)


def _first_node(arg) -> fx.Node:
    """The first tensor node in a (possibly nested) output structure."""
    if isinstance(arg, fx.Node):
        return arg
    values = arg.values() if isinstance(arg, dict) else arg
    return next(_first_node(v) for v in values if v is not None)
