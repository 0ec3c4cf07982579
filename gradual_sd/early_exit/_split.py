"""Cut a model's exported graph at its tapped stages into segments that run one after another.

While ``torch.export`` traces the model, a forward hook on every tapped stage passes each
tensor the stage returns through an opaque marker operator, so the exported graph shows
exactly where each stage ends and which tensors it hands on, whatever the model's structure:
the cut comes from the same stage names the distiller taps, with no ``nn.Sequential``
requirement. Segment ``k`` takes stage ``k - 1``'s tensors (the images for the first) and
returns stage ``k``'s (the last returns the logits). A segment may read nothing else that
depends on the input: a tensor computed before an earlier stage is refused by name.
Parameters, buffers and values computed from them alone are copied into every segment that
uses them, and sizes (the batch above all) are recomputed from each segment's own inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from .._records import StageInfo
from .._probing import main_logits
from .._taps import Hooks


class SplitError(ValueError):
    """The model cannot be cut at these stages; the message names the stage and the reason."""


@dataclass(frozen=True)
class Segment:
    """One piece of the backbone: ``module(*inputs) -> tuple of outputs``.

    Attributes:
        module: The segment as a runnable graph (parameters included).
        inputs: How many tensors it takes (the previous segment's outputs, or the images).
        head_input: Which of its outputs the stage's head reads (``None`` for the last segment,
            whose only output is the logits).
    """

    module: fx.GraphModule
    inputs: int
    head_input: int | None


@torch.library.custom_op("gradual_sd::stage_output", mutates_args=())
def _stage_output(x: torch.Tensor, stage: int, leaf: int) -> torch.Tensor:
    """Marks tensor ``leaf`` of stage ``stage``'s output in a traced graph (a copy in eager)."""
    return x.clone()


@_stage_output.register_fake
def _(x: torch.Tensor, stage: int, leaf: int) -> torch.Tensor:
    return torch.empty_like(x)


_MARKER = torch.ops.gradual_sd.stage_output.default


def batch_dynamic_shapes(count: int) -> tuple[dict[int, Dim], ...]:
    """``dynamic_shapes`` for ``count`` inputs that share a dynamic batch axis 0."""
    batch = Dim("batch")
    return tuple({0: batch} for _ in range(count))


@contextlib.contextmanager
def _marked_stages(model: nn.Module, stages: Sequence[StageInfo]) -> Iterator[dict[int, int]]:
    """Hooks that pass every tensor each stage returns through the marker; yields, per stage,
    which of its flattened outputs its head reads (filled as the model runs)."""
    tapped: dict[int, int] = {}

    def mark(k: int, name: str, output: object) -> object:
        leaves, spec = pytree.tree_flatten(output)
        element = output if stages[k].element is None else output[stages[k].element]  # type: ignore[index]
        tapped[k] = next(i for i, leaf in enumerate(leaves) if leaf is element)
        marked = [_MARKER(x, k, i) if isinstance(x, torch.Tensor) else x for i, x in enumerate(leaves)]
        return pytree.tree_unflatten(marked, spec)

    with Hooks(model) as hooks:
        for k, stage in enumerate(stages):
            hooks.on_output(stage.name, partial(mark, k))
        yield tapped


def export_program(
    model: nn.Module, example: torch.Tensor, stages: Sequence[StageInfo]
) -> tuple[ExportedProgram, dict[int, int]]:
    """The model's graph in functional ATen operators with a dynamic batch and the stages'
    outputs marked; and which marked output each head reads."""
    try:
        with _marked_stages(model, stages) as tapped:
            program = torch.export.export(
                model, (example,), dynamic_shapes=batch_dynamic_shapes(1), strict=False
            )
    except Exception as error:  # torch.export raises many types; all mean "cannot export"
        raise SplitError(
            f"torch.export cannot trace {type(model).__name__} with a dynamic batch size "
            f"({type(error).__name__}: {_first_line(error)}); exits can still run in PyTorch "
            "(EarlyExitModel), but not as exported files"
        ) from error
    return program.run_decompositions({}), tapped


def split_model(model: nn.Module, stages: Sequence[StageInfo], example: torch.Tensor) -> list[Segment]:
    """Segments of ``model`` cut after each of ``stages``, traced on ``example`` (a batch of
    at least two: a batch of one would fix the size), in eval mode.

    Raises:
        SplitError: naming the stage and what crosses it, or why the model cannot be exported.
    """
    if example.shape[0] < 2:
        raise ValueError("split_model needs an example batch of at least 2 (a batch of 1 fixes the size)")
    program, tapped = export_program(model, example, stages)
    with torch.no_grad():
        logits_leaf = _logits_leaf(model(example))
    cut = _Cut(program, stages, tapped, logits_leaf)
    return [cut.segment(k) for k in range(len(stages) + 1)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _logits_leaf(output: object) -> int:
    """Position of the logits among the flattened leaves of a model's output."""
    logits = main_logits(output)
    leaves = pytree.tree_leaves(output)
    for index, leaf in enumerate(leaves):
        if leaf is logits:
            return index
    raise SplitError(f"cannot find the logits among the model's outputs ({type(output).__name__})")


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _where(node: fx.Node, stages: Sequence[StageInfo]) -> str:
    """The module a node was computed in, for error messages."""
    if node.target is _MARKER:
        return f"stage {stages[node.args[1]].name!r}'s output"
    stack = node.meta.get("nn_module_stack") or {}
    path = [value[0] for value in stack.values() if value[0]]
    return f"a tensor computed in {path[-1]!r}" if path else f"the tensor {node.name!r}"


class _Cut:
    """The bookkeeping of one cut: which segment computes each node, and the segments' graphs."""

    def __init__(
        self, program: ExportedProgram, stages: Sequence[StageInfo], tapped: dict[int, int], logits_leaf: int
    ) -> None:
        self.program = program
        self.graph = program.graph
        self.stages = list(stages)
        signature = program.graph_signature
        self.constants: dict[str, object] = {}
        for name, target in signature.inputs_to_parameters.items():
            self.constants[name] = program.state_dict[target]
        for name, target in signature.inputs_to_buffers.items():
            value = program.state_dict.get(target)
            self.constants[name] = value if value is not None else program.constants[target]
        for name, target in signature.inputs_to_lifted_tensor_constants.items():
            self.constants[name] = program.constants[target]
        user_inputs = [
            n for n in self.graph.nodes if n.op == "placeholder" and n.name in signature.user_inputs
        ]
        if len(user_inputs) != 1:
            raise SplitError(f"the model takes {len(user_inputs)} tensor inputs; exits need one (the images)")
        self.images = user_inputs[0]
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}
        self.data = self._depends_on_input()
        self.boundaries = [self._stage_outputs(k, tapped) for k in range(len(self.stages))]
        output_node = next(n for n in self.graph.nodes if n.op == "output")
        self.logits = output_node.args[0][logits_leaf]
        self.ends = [max(self.order[n] for n in markers) for markers, _, _ in self.boundaries]
        for k in range(1, len(self.ends)):
            if self.ends[k] <= self.ends[k - 1]:
                raise SplitError(
                    f"stage {self.stages[k].name!r} finishes before stage {self.stages[k - 1].name!r}; "
                    "list the stages in the order they run"
                )
        self.segment_of = {node: self._segment_index(node) for node in self.data}

    def _depends_on_input(self) -> set[fx.Node]:
        """Tensor-valued nodes computed from the images (sizes are handled apart)."""
        data = {self.images}
        for node in self.graph.nodes:
            if node.op == "call_function" and not _is_size(node):
                if any(arg in data for arg in node.all_input_nodes):
                    data.add(node)
        return data

    def _stage_outputs(self, k: int, tapped: dict[int, int]) -> tuple[list[fx.Node], list[fx.Node], int]:
        """Stage ``k``'s markers and the tensors they mark, in the order the stage returns
        them, and which one its head reads."""
        name = self.stages[k].name
        markers = [n for n in self.graph.nodes if n.target is _MARKER and n.args[1] == k]
        leaves = [n.args[2] for n in markers]
        if not markers or k not in tapped:
            raise SplitError(f"stage {name!r} did not run when the model was traced")
        if len(set(leaves)) != len(leaves):
            raise SplitError(
                f"stage {name!r} runs more than once in the traced model; tap a module that runs once"
            )
        markers.sort(key=lambda n: n.args[2])
        leaves = [n.args[2] for n in markers]
        if tapped[k] not in leaves:
            raise SplitError(f"stage {name!r}'s tapped output is not a tensor in the traced model")
        return markers, [n.args[0] for n in markers], leaves.index(tapped[k])

    def _segment_index(self, node: fx.Node) -> int:
        position = self.order[node]
        return sum(1 for end in self.ends if end < position)

    def segment(self, k: int) -> Segment:
        """Segment ``k``: from stage ``k - 1``'s outputs (the images for ``k = 0``) to stage
        ``k``'s outputs (the logits after the last stage)."""
        graph = fx.Graph()
        attributes: dict[str, object] = {}
        env: dict[fx.Node, fx.Node] = {}
        incoming = [self.images] if k == 0 else self.boundaries[k - 1][0]  # the previous stage's markers
        for i, node in enumerate(incoming):
            placeholder = graph.placeholder("images" if k == 0 else f"stage_output_{i}")
            placeholder.meta["val"] = node.meta.get("val")
            env[node] = placeholder
        last = k == len(self.stages)
        wanted = [self.logits] if last else self.boundaries[k][1]
        crossing = self.stages[k - 1].name if k else None

        def local(node: fx.Node) -> fx.Node:
            if node in env:
                return env[node]
            if node.op == "placeholder":  # a parameter, buffer or constant
                attributes[node.name] = self.constants[node.name]
                env[node] = graph.get_attr(node.name)
            elif node.op == "get_attr":
                attributes[node.target] = getattr(self.program.graph_module, node.target)
                env[node] = graph.get_attr(node.target)
            elif node in self.data and self.segment_of[node] != k:
                raise self._crossing(node, k)
            elif _is_size(node) and node.target is torch.ops.aten.sym_size.int:
                env[node] = self._local_size(graph, node, incoming, env, crossing)
            else:  # a size computed from sizes, or a value computed from parameters alone
                env[node] = graph.node_copy(node, local)
            return env[node]

        for node in self._needed(wanted, k):
            if node not in env:
                env[node] = graph.node_copy(node, local)
        for node in wanted:
            local(node)
        graph.output(tuple(env[node] for node in wanted))
        graph.eliminate_dead_code()
        module = fx.GraphModule(attributes, graph)
        head_input = None if last else self.boundaries[k][2]
        return Segment(module, len(incoming), head_input)

    def _crossing(self, node: fx.Node, k: int) -> SplitError:
        """The refusal for segment ``k`` reading ``node``, named by the first stage it crosses
        (a stage's own output may pass its next stage only)."""
        crossed = self.stages[self.segment_of[node] + (node.target is _MARKER)].name
        reader = self.stages[k - 1].name
        return SplitError(
            f"samples cannot leave at stage {crossed!r}: {_where(node, self.stages)} from before it is "
            f"read after stage {reader!r} (a cross-stage link); tap only stages after which "
            "nothing earlier is read"
        )

    def _needed(self, wanted: list[fx.Node], k: int) -> list[fx.Node]:
        """The input-dependent nodes of segment ``k`` that ``wanted`` is computed from, in
        graph order (walked without recursion: a segment can be thousands of nodes deep)."""
        needed: set[fx.Node] = set()
        stack = list(wanted)
        while stack:
            node = stack.pop()
            if node in needed or self.segment_of.get(node) != k:
                continue
            needed.add(node)
            stack.extend(node.all_input_nodes)
        return [node for node in self.graph.nodes if node in needed]

    def _local_size(
        self,
        graph: fx.Graph,
        node: fx.Node,
        incoming: list[fx.Node],
        env: dict[fx.Node, fx.Node],
        crossing: str | None,
    ) -> fx.Node:
        """A size read from a tensor of this segment: the node's own tensor if it is computed
        here, else the same symbolic size on one of the segment's inputs."""
        source, axis = node.args[0], node.args[1]
        if source in env:
            return graph.call_function(torch.ops.aten.sym_size.int, (env[source], axis))
        expression = node.meta["val"].node.expr
        for tensor in incoming:
            for i, size in enumerate(tensor.meta["val"].shape):
                if isinstance(size, torch.SymInt) and size.node.expr == expression:
                    return graph.call_function(torch.ops.aten.sym_size.int, (env[tensor], i))
        raise SplitError(
            f"samples cannot leave at stage {crossing!r}: the model after it reads the size "
            f"{expression} of {_where(source, self.stages)}, which no output of that stage has"
        )


def run_segments(
    segments: Sequence[Segment], images: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``segments`` in a chain: each head's input and the logits."""
    carried: tuple[torch.Tensor, ...] = (images,)
    head_inputs = []
    for segment in segments:
        carried = segment.module(*carried)
        if segment.head_input is not None:
            head_inputs.append(carried[segment.head_input])
    return head_inputs, carried[0]
