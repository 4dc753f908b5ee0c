"""Rewrites of an exported ONNX graph that onnxruntime runs faster or that store it smaller, with the same
arithmetic.

:func:`rewrite_graph` applies every rewrite of :data:`REWRITES` to a ``ModelProto`` in place and returns
how many places each changed. A rewrite at most reorders how the same sums are computed (results differ by
float rounding, far inside the exporter's parity tolerance, which :mod:`recurzoo.export.onnx` checks on
the rewritten file).

- :func:`pointwise_convs`: a matmul over the channels of a channels-last view of an NCHW map,
  ``Transpose(0,2,3,1) -> MatMul(W) [-> Add(b)] -> Transpose(0,3,1,2)`` (HorNet's ``PointwiseConv2d``,
  a 1x1 convolution computed channels-last in eager PyTorch), becomes the 1x1 ``Conv`` it stands for:
  onnxruntime keeps the chains of such convolutions and the gates between them in its blocked NCHWc
  layout instead of transposing every map twice.
- :func:`folded_weights`: the weights and biases of ``Conv``/``MatMul``/``Gemm`` that the graph computes from
  initializers (a 1x1 convolution's flattened, transposed, scaled or sliced weight, once for every scale
  MSRNet runs its backbone on) become initializers, each distinct tensor stored once. onnxruntime folds them
  when it loads the graph anyway; its quantizer takes only a stored weight, and its own folding stored one
  copy for every reader.
- :func:`shared_constants`: identical constant tensors of 1 KiB or more are stored once. The exporter writes
  a constant for every module that computes one (RGT's shifted-window masks: 18 copies of 1 MiB in
  ``rgt_small_x2`` at 64x64, the same in every residual group).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

__all__ = ["REWRITES", "rewrite_graph", "pointwise_convs", "folded_weights", "shared_constants"]

_TO_CHANNELS_LAST = [0, 2, 3, 1]
_TO_CHANNELS_FIRST = [0, 3, 1, 2]


class _Graph:
    """Who produces and who consumes each value of an ONNX graph, and which values are constant."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.initializers = {tensor.name for tensor in graph.initializer}
        self.outputs = {value.name for value in graph.output}
        self.producer: Dict[str, Any] = {}
        self.consumers: Dict[str, List[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)
        self._constant: Dict[str, bool] = {}
        self._names: Set[str] = set(self.producer) | self.initializers | {value.name for value in graph.input}

    def constant(self, name: str) -> bool:
        """Whether ``name`` is computed from initializers and ``Constant`` nodes only (onnxruntime folds it)."""
        if name in self._constant:
            return self._constant[name]
        stack, order = [name], []
        while stack:  # iterative: weight chains are short, but a graph may be deep
            current = stack.pop()
            if current in self._constant or current in order:
                continue
            order.append(current)
            node = self.producer.get(current)
            if node is not None:
                stack.extend(i for i in node.input if i and i not in self._constant)
        for current in reversed(order):
            node = self.producer.get(current)
            if current in self.initializers:
                self._constant[current] = True
            elif node is None:  # a graph input
                self._constant[current] = False
            else:
                self._constant[current] = all(self._constant.get(i, False) for i in node.input if i)
        return self._constant[name]

    def only_consumer(self, name: str) -> Optional[Any]:
        """The one node that reads ``name``, when it is one node and ``name`` is no graph output."""
        consumers = self.consumers.get(name, [])
        return consumers[0] if len(consumers) == 1 and name not in self.outputs else None

    def fresh(self, stem: str) -> str:
        """A value name not used in the graph."""
        index = 0
        while f"{stem}_{index}" in self._names:
            index += 1
        self._names.add(f"{stem}_{index}")
        return f"{stem}_{index}"


def _perm(node: Any) -> List[int]:
    return next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), [])


def _value_ranks(model: Any) -> Dict[str, int]:
    """The rank of every value whose rank ONNX shape inference finds."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    ranks = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    for tensor in graph.initializer:
        ranks[tensor.name] = len(tensor.dims)
    return ranks


def pointwise_convs(model: Any) -> int:
    """Each ``Transpose(0,2,3,1) -> MatMul(W) [-> Add(b)] -> Transpose(0,3,1,2)`` with a constant 2-D
    ``W`` (and a constant 1-D ``b``) becomes ``Conv(x, W^T[:, :, None, None], b)``; returns how many.

    The weight is rearranged by graph nodes on constants (``Transpose``, ``Unsqueeze``), which
    onnxruntime folds when it loads the graph; a transpose left without readers is removed.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    view = _Graph(graph)
    ranks = _value_ranks(model)
    replaced: Dict[int, List[Any]] = {}  # id of the closing transpose -> the nodes that replace it
    removed: Set[int] = set()
    axes_name: Optional[str] = None
    for matmul in list(graph.node):
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        opening = view.producer.get(matmul.input[0])
        weight = matmul.input[1]
        if (
            opening is None
            or opening.op_type != "Transpose"
            or _perm(opening) != _TO_CHANNELS_LAST
            or ranks.get(weight) != 2
            or not view.constant(weight)
        ):
            continue
        following, bias, chain = view.only_consumer(matmul.output[0]), None, [matmul]
        if following is not None and following.op_type == "Add":
            other = [name for name in following.input if name != matmul.output[0]]
            if len(other) == 1 and ranks.get(other[0]) == 1 and view.constant(other[0]):
                bias, chain = other[0], [matmul, following]
                following = view.only_consumer(following.output[0])
        if following is None or following.op_type != "Transpose" or _perm(following) != _TO_CHANNELS_FIRST:
            continue
        if axes_name is None:
            axes_name = view.fresh("pointwise_conv_axes")
            graph.initializer.append(onnx.numpy_helper.from_array(_int64([2, 3]), axes_name))
        stem = view.fresh(f"{matmul.name or 'MatMul'}_conv")
        transposed, kernel = f"{stem}_weight_t", f"{stem}_weight"
        nodes = [
            helper.make_node("Transpose", [weight], [transposed], name=f"{stem}_transpose_weight", perm=[1, 0]),
            helper.make_node("Unsqueeze", [transposed, axes_name], [kernel], name=f"{stem}_kernel"),
            helper.make_node(
                "Conv",
                [opening.input[0], kernel, *([bias] if bias else [])],
                list(following.output),
                name=stem,
                kernel_shape=[1, 1],
            ),
        ]
        replaced[id(following)] = nodes
        removed.update(id(node) for node in chain)
        view.consumers[opening.output[0]].remove(matmul)
    for node in graph.node:  # openings read by nothing any more
        if node.op_type == "Transpose" and _perm(node) == _TO_CHANNELS_LAST and node.output[0] not in view.outputs:
            if not view.consumers.get(node.output[0]):
                removed.add(id(node))
    if not replaced:
        return 0
    kept = []
    for node in graph.node:
        if id(node) in replaced:
            kept.extend(replaced[id(node)])
        elif id(node) not in removed:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return len(replaced)


def _int64(values: List[int]) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.int64)


def shared_constants(model: Any, min_bytes: int = 1024) -> int:
    """Store identical constants (``Constant`` nodes, initializers) of ``min_bytes`` or more once; the
    readers of each copy read the first. Returns how many copies were removed.

    A graph with subgraphs (``If``, ``Loop``) is left as it is: a subgraph may read a copy by name.
    """
    from onnx import numpy_helper

    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    first_by_value: Dict[Tuple[int, Tuple[int, ...], bytes], str] = {}
    outputs = {value.name for value in graph.output}

    def copy_of(tensor: Any, name: str) -> Optional[str]:
        """The name of an earlier identical constant, if ``tensor`` (named ``name``) repeats one."""
        values = numpy_helper.to_array(tensor)
        if values.nbytes < min_bytes or name in outputs:
            return None
        first = first_by_value.setdefault((tensor.data_type, tuple(tensor.dims), values.tobytes()), name)
        return first if first != name else None

    renamed: Dict[str, str] = {}
    for tensor in list(graph.initializer):
        first = copy_of(tensor, tensor.name)
        if first is not None:
            renamed[tensor.name] = first
            graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        first = copy_of(node.attribute[0].t, node.output[0])
        if first is not None:
            renamed[node.output[0]] = first
            graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    return len(renamed)


_WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
# operators that draw new values on every run (Dropout in training mode): what they compute is no constant
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


def folded_weights(model: Any) -> int:
    """Store each weight or bias input of ``Conv``/``MatMul``/``Gemm`` that is computed from initializers only
    (and is no larger than the initializers it reads) as an initializer; returns how many inputs now read one.

    Equal tensors share one initializer (also with an existing one), and the nodes and initializers left
    without readers are removed. A value computed with an operator outside ONNX's standard domain (the
    reference evaluator that computes it has no implementation), with a random one, or from an initializer
    that a graph input overrides is left to the graph; so is every value of a graph with subgraphs.
    """
    from onnx import numpy_helper

    graph = model.graph
    view = _Graph(graph)
    overridable = {value.name for value in graph.input} & view.initializers
    chains = {
        name: _ancestors(view, [name])
        for node in graph.node
        if node.op_type in _WEIGHTED_OPS and node.domain in ("", "ai.onnx")
        for name in node.input[1:]
        if name and name not in view.initializers and view.constant(name)
    }
    targets = sorted(name for name, chain in chains.items() if _foldable(view, chain, overridable))
    if not targets or _has_subgraphs(graph):
        return 0
    values = _evaluate(model, view, targets)
    sizes = {tensor.name: numpy_helper.to_array(tensor).nbytes for tensor in graph.initializer}
    stored: Dict[Tuple[str, Tuple[int, ...], bytes], str] = {}
    for tensor in graph.initializer:
        if tensor.name not in overridable:
            array = numpy_helper.to_array(tensor)
            stored.setdefault((array.dtype.str, array.shape, array.tobytes()), tensor.name)
    renamed: Dict[str, str] = {}
    for name in targets:
        array = values[name]
        if array.nbytes > sum(sizes[source] for source in chains[name] & view.initializers):
            continue  # a broadcast or a gather materialised: left for onnxruntime
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in stored:
            stored[key] = view.fresh(f"{name}_folded")
            graph.initializer.append(numpy_helper.from_array(array, stored[key]))
        renamed[name] = stored[key]
    for node in graph.node:
        if node.op_type in _WEIGHTED_OPS:
            for index, name in enumerate(node.input):
                if index and name in renamed:
                    node.input[index] = renamed[name]
    _drop_unread(graph)
    return len(renamed)


def _has_subgraphs(graph: Any) -> bool:
    """Whether a node of ``graph`` holds a subgraph (``If``, ``Loop``, ``Scan``), which may read any value by name."""
    from onnx import AttributeProto

    return any(attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for attr in n.attribute)


def _ancestors(view: _Graph, names: List[str]) -> Set[str]:
    """``names`` and every value of ``view``'s graph that they are computed from."""
    found: Set[str] = set()
    stack = list(names)
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.add(current)
        if current in view.producer:
            stack.extend(i for i in view.producer[current].input if i)
    return found


def _foldable(view: _Graph, chain: Set[str], overridable: Set[str]) -> bool:
    """Whether the values ``chain`` are computed by standard, deterministic operators from initializers that
    no graph input overrides."""
    nodes = [view.producer[name] for name in chain if name in view.producer]
    standard = all(node.domain in ("", "ai.onnx") and node.op_type not in _RANDOM_OPS for node in nodes)
    return standard and not chain & overridable


def _evaluate(model: Any, view: _Graph, names: List[str]) -> Dict[str, Any]:
    """The values of the constant ``names`` of ``model``'s graph, computed by ONNX's reference evaluator."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    needed = _ancestors(view, names)
    graph = model.graph
    nodes = [node for node in graph.node if any(output in needed for output in node.output)]
    subgraph = helper.make_graph(
        nodes,
        "constant_weights",
        [],
        [helper.make_empty_tensor_value_info(name) for name in names],
        [tensor for tensor in graph.initializer if tensor.name in needed],
    )
    evaluator = ReferenceEvaluator(helper.make_model(subgraph, opset_imports=model.opset_import))
    return dict(zip(names, evaluator.run(None, {})))


def _drop_unread(graph: Any) -> None:
    """Remove the nodes whose outputs nothing reads (no graph output), then the initializers nothing reads
    (an initializer that is also a graph input, its default value, is kept)."""
    read = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):  # topological order: a node's readers come after it
        if any(output in read for output in node.output):
            kept.append(node)
            read.update(node.input)
    read.update(value.name for value in graph.input)
    initializers = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.initializer[:]
    graph.initializer.extend(initializers)


REWRITES: Tuple[Tuple[str, Callable[[Any], int]], ...] = (
    ("pointwise convs", pointwise_convs),
    ("folded weights", folded_weights),
    ("shared constants", shared_constants),
)


def rewrite_graph(
    model: Any, rewrites: Optional[Tuple[Tuple[str, Callable[[Any], int]], ...]] = None
) -> Dict[str, int]:
    """Apply ``rewrites`` (default :data:`REWRITES`) to ``model`` in place; how many places each changed."""
    return {name: rewrite(model) for name, rewrite in (REWRITES if rewrites is None else rewrites)}
