"""Sequential layer-wise execution of a transformers causal LM with bounded device memory.

``capture_layer_inputs``: run the calibration windows through the embeddings only (every decoder layer
temporarily replaced by a recorder) to get the first layer's hidden states and the exact positional and
keyword arguments the model passes to EACH decoder layer (position embeddings, attention mask, position
ids, ... whatever this transformers version uses). Recorded kwargs are shared between layers when the
model passes the same objects (the usual case), so per-layer masks (sliding-window layers) cost memory
only where they really differ.
``walk_layers``: for each decoder layer in order, bring it alone to the compute device and hand it to the
caller with its inputs; afterwards recompute its outputs with whatever weights it now has, and feed them
to the next layer. The rest of the model stays where it is (usually the CPU). Where a layer's weights come
from and go back to is a ``LayerIO``: by default the module itself, moved to the device and back; a model
built without weights reads each layer from disk instead (``stream``).
``LayerStrategy``: how one layer's work is shared between workers (one worker does everything by default).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmprune_kernels.pipeline.data import DEFAULT_BATCH_SIZE, check_windows
from llmprune_kernels.pipeline.memory import device_batches, to_host
from llmprune_kernels.pipeline.models import decoder_layers_parent, find_decoder_layers
from llmprune_kernels.validation import check_finite


class StopForward(Exception):
    """Raised by a hook to end a forward call early (nothing after it is needed): the last recorder of the
    capture, the statistics feed once the last Linear of a layer has had its input."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its call, returns the input unchanged."""

    def __init__(self, index: int, sink: list, last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.append((hidden, rest, kwargs))
        if self.last:
            raise StopForward
        return hidden


def _same_call(a: tuple, b: tuple) -> bool:
    """Two recorded (args, kwargs) are the same call when they hold the very same objects."""
    (a_args, a_kw), (b_args, b_kw) = a, b
    return (len(a_args) == len(b_args) and all(x is y for x, y in zip(a_args, b_args))
            and a_kw.keys() == b_kw.keys() and all(a_kw[k] is b_kw[k] for k in a_kw))


def _module_device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


@dataclass
class CapturedInputs:
    """First-layer hidden states per calibration batch and each layer's call arguments per batch."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]  # calls[batch][k] = (args, kwargs), k a distinct call
    layer_call: list[list[int]]  # layer_call[batch][layer] = index into calls[batch]

    def call(self, batch: int, layer: int) -> tuple[tuple, dict]:
        return self.calls[batch][self.layer_call[batch][layer]]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    offload: bool = False,
) -> CapturedInputs:
    """Run ``input_ids`` (n, seqlen) up to the decoder layers; see the module docstring.

    Only the non-layer parts next to the decoder layers (embeddings, rotary embedding, norms) are
    moved to ``device``, and moved back afterwards. ``offload`` keeps hidden states in (pinned) CPU memory.
    """
    device = torch.device(device)
    check_windows(input_ids, model, "calibration windows")
    _, layers = find_decoder_layers(model)
    parent = decoder_layers_parent(model)
    moved = [(m, _module_device(m)) for name, m in parent.named_children() if m is not layers]
    originals = list(layers)
    sink: list = []
    hidden, calls, layer_call = [], [], []
    try:
        for m, _ in moved:
            m.to(device)
        for i in range(len(layers)):
            layers[i] = _Recorder(i, sink, last=i == len(layers) - 1)
        for batch in input_ids.split(batch_size):
            sink.clear()
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
            if len(sink) != len(layers):
                raise RuntimeError(f"{type(model).__name__} called {len(sink)} of its {len(layers)} decoder layers "
                                   f"during capture; the pipeline needs every layer called once per forward")
            h0 = sink[0][0]
            check_finite_fast(h0, "first decoder layer inputs (embeddings)")
            hidden.append(to_host(h0) if offload else h0)
            distinct: list[tuple[tuple, dict]] = []
            idx = []
            for _, args, kwargs in sink:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                call = (args, kwargs)
                j = next((j for j, c in enumerate(distinct) if _same_call(c, call)), None)
                if j is None:
                    distinct.append(call)
                    j = len(distinct) - 1
                idx.append(j)
            calls.append(distinct)
            layer_call.append(idx)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m, dev in moved:
            if dev is not None:
                m.to(dev)
        sink.clear()
    return CapturedInputs(hidden, calls, layer_call)


def check_finite_fast(t: torch.Tensor, what: str) -> None:
    """``check_finite`` at the cost of one reduction: NaN/Inf make the fp32 sum non-finite.

    Only when the sum is not finite (a NaN/Inf, or an fp32 overflow of huge values) is the exact,
    allocating check run, which then raises with the counts or passes.
    """
    if not bool(torch.isfinite(torch.sum(t, dtype=torch.float32))):
        check_finite(t, what)


def _layer_output(out: Any) -> torch.Tensor:
    # transformers 5.x decoder layers return the hidden states; 4.x returned a tuple (hidden, ...).
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerStep:
    """One decoder layer on the compute device together with its calibration inputs."""

    def __init__(self, index: int, name: str, layer: nn.Module, inputs: list[torch.Tensor],
                 calls: list[tuple[tuple, dict]], device: torch.device, offload: bool) -> None:
        self.index, self.name, self.layer = index, name, layer
        self.inputs, self.calls, self.device, self.offload = inputs, calls, device, offload
        self.outputs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, hooks: Mapping[nn.Module, Callable] | None = None, keep: bool = False,
                pre_hooks: Mapping[nn.Module, Callable] | None = None) -> list[torch.Tensor]:
        """Run every calibration batch through the layer with optional forward (pre-)hooks on submodules.

        ``keep`` stores the outputs as the inputs of the next layer. Without ``keep`` a hook may end a call
        early by raising ``StopForward``.
        """
        handles = [m.register_forward_hook(fn) for m, fn in (hooks or {}).items()]
        handles += [m.register_forward_pre_hook(fn) for m, fn in (pre_hooks or {}).items()]
        outs, sums = [], []
        try:
            for h, (args, kwargs) in zip(device_batches(self.inputs, self.device), self.calls):
                try:
                    out = _layer_output(self.layer(h, *args, **kwargs))
                except StopForward:
                    if keep:
                        raise RuntimeError(f"a hook ended the forward of decoder layer {self.name} early, "
                                           "but its outputs are needed") from None
                    continue
                if keep:  # checked once after the batches: no device sync per batch
                    sums.append(torch.sum(out, dtype=torch.float32))
                    outs.append(to_host(out, non_blocking=True) if self.offload else out)
        finally:
            for hd in handles:
                hd.remove()
        if keep:
            if self.offload and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the host copies are complete
            finite = torch.isfinite(torch.stack(sums)).tolist() if sums else []
            for out, ok in zip(outs, finite):
                if not ok:  # the exact check (an fp32 overflow of huge finite values passes it)
                    check_finite(out, f"outputs of decoder layer {self.name}")
            self.outputs = outs
        return outs

    def propagate(self, hooks: Mapping[nn.Module, Callable] | None = None) -> None:
        """Recompute the layer's outputs with its current weights; they feed the next layer."""
        self.forward(hooks, keep=True)


class LayerIO:
    """Where a decoder layer's weights come from before its step and go back to after it.

    This default moves the module to the compute device and back to where it was. ``load`` returns what
    ``unload`` needs to put the layer back.
    """

    def load(self, index: int, layer: nn.Module, device: torch.device) -> Any:
        home = _module_device(layer)
        layer.to(device)
        return home

    def unload(self, index: int, layer: nn.Module, token: Any) -> None:
        if token is not None:
            layer.to(token)


class InPlace(LayerIO):
    """The layer stays where it is (pruning without calibration needs no forward pass)."""

    def load(self, index: int, layer: nn.Module, device: torch.device) -> Any:
        return None


class LayerStrategy:
    """How one layer's work is shared between workers; this default is a single worker doing all of it.

    A multi-worker run overrides the points the pipeline calls in each layer step, in this order:
    ``reduce_statistics`` after the statistics forward (sum every pruner's statistics over the workers,
    each having run its share of the calibration batches), ``assigned`` (the Linears this worker prunes),
    ``share_pruned`` after pruning (send each pruned weight from the worker that pruned it to all others,
    before the outputs are recomputed), and ``writes`` (whether this worker writes the output and the
    resume checkpoints).
    """

    writes: bool = True

    def reduce_statistics(self, step: "LayerStep", pruners: Mapping[str, Any]) -> None:
        pass

    def assigned(self, step: "LayerStep", linears: Mapping[str, nn.Linear]) -> list[str]:
        return list(linears)

    def share_pruned(self, step: "LayerStep", linears: Mapping[str, nn.Linear], pruned: list[str]) -> None:
        pass


def walk_layers(model: nn.Module, captured: CapturedInputs, device: torch.device | str = "cpu",
                offload: bool = False, *, start: int = 0, stop: int | None = None,
                hidden: list[torch.Tensor] | None = None, io: LayerIO | None = None) -> Iterator[LayerStep]:
    """Yield a ``LayerStep`` per decoder layer, in order, with the layer alone on ``device``.

    When the caller resumes the loop, the step's outputs are recomputed (unless it already called
    ``propagate``) and ``io`` puts the layer back (default: moved back to its original device).
    ``start`` / ``stop`` walk layers ``start`` to ``stop - 1`` only, ``hidden`` being the hidden states
    entering layer ``start`` (default: the captured first-layer inputs).
    """
    device = torch.device(device)
    io = io or LayerIO()
    path, layers = find_decoder_layers(model)
    inputs = captured.hidden if hidden is None else hidden
    nbatch = len(inputs)
    for i in range(start, len(layers) if stop is None else stop):
        layer = layers[i]
        token = io.load(i, layer, device)
        calls = [captured.call(b, i) for b in range(nbatch)]
        step = LayerStep(i, f"{path}.{i}", layer, inputs, calls, device, offload)
        try:
            yield step
            if step.outputs is None:
                step.propagate()
        finally:
            io.unload(i, layer, token)
        inputs = step.outputs
