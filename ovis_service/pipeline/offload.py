"""Putting the weights where a memory plan says (`memory.Plan`), all lossless: the same
weights reach the same kernels, only when they travel differs. Whatever travels waits in pinned
CPU memory, so copies run at full PCIe speed; the VAE (0.16 GB) always stays.

- `none`: everything on the device.
- `encoder`: the transformer stays; the text encoder comes in to encode a prompt and leaves
  before the transformer's first forward.
- `group`: as `encoder`, and the transformer's leading blocks stay while the rest stream in one
  block ahead of use on a side CUDA stream, so copies overlap compute.
- `model`: the text encoder and the transformer take turns on the device.
- `sequential`: diffusers' group offloading at leaf level (one layer at a time), with a side
  stream and prefetching on CUDA.

Weights kept in pinned memory are copied in and dropped, never copied back: inference does not
change them, so "offloading" is pointing a parameter at its CPU copy again.
"""

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import OvisImagePipeline
from diffusers.hooks import apply_group_offloading

from ovis_service.pipeline.memory import Plan, transformer_blocks

# Set on each streamed block, so that regional compile leaves it alone: its hooks move weights,
# which a full-graph compile cannot trace.
STREAMED = "_ovis_streamed"


class PinnedWeights:
    """A module's parameters and buffers, kept in CPU memory (pinned when the device is CUDA,
    so copies can run asynchronously); `onload` copies them to the device on the current
    stream, `offload` points them back at the CPU copies."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.loaded = False
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        pin = device.type == "cuda"
        for tensor in [*module.parameters(), *module.buffers()]:
            # One tensor at a time, so CPU memory never holds two copies of the module.
            cpu = _cpu_copy(tensor, pin)
            tensor.data = cpu
            self._pairs.append((tensor, cpu))

    def onload(self) -> None:
        for tensor, cpu in self._pairs:
            tensor.data = cpu.to(self.device, non_blocking=True)
        self.loaded = True

    def offload(self) -> None:
        for tensor, cpu in self._pairs:
            tensor.data = cpu
        self.loaded = False

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Memory copied in on a side stream is read on `stream`: keep the allocator from
        handing it to the side stream again before `stream` is done with it."""
        for tensor, _cpu in self._pairs:
            tensor.data.record_stream(stream)


def _cpu_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    cpu = tensor.data.to("cpu")
    return cpu.pin_memory() if pin and not cpu.is_pinned() else cpu


class TakingTurns:
    """Components that come to the device only for their own forward: the text encoder always
    (before its first forward; the negative prompt's forward finds it there), the transformer
    too under `model`. A component's forward sends every other travelling one out first, so at
    most one of them is on the device."""

    def __init__(
        self, pipe: OvisImagePipeline, device: torch.device, *, transformer_travels: bool
    ) -> None:
        travelling = {"text_encoder": pipe.text_encoder}
        if transformer_travels:
            travelling["transformer"] = pipe.transformer
        self.weights = {name: PinnedWeights(module, device) for name, module in travelling.items()}
        for name in ("text_encoder", "transformer"):
            getattr(pipe, name).register_forward_pre_hook(self._turn_of(name))

    def _turn_of(self, name: str) -> Any:
        def before(_module: torch.nn.Module, _args: Any) -> None:
            for other, weights in self.weights.items():
                if other != name and weights.loaded:
                    weights.offload()
            own = self.weights.get(name)
            if own is not None and not own.loaded:
                own.onload()

        return before


class BlockStreamer:
    """Streams `blocks` (run in this order, over and over) from pinned memory: each block's
    pre-hook waits for its own copy and starts the next block's on a side stream; its post-hook
    drops it. The last block starts the first one's copy, for the next forward. On the CPU there
    is no stream and copies are synchronous (tests exercise the hooks there).

    The host runs ahead of the GPU, and memory a block leaves is reused only once the GPU has
    finished with it; so before starting a copy, the host waits until the GPU is done with the
    block two back. That bounds what is on the device to about `memory.STREAM_DEPTH` blocks while
    the GPU always has the previous block queued."""

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device) -> None:
        self._weights = [PinnedWeights(block, device) for block in blocks]
        self._device = device
        cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]
        self._ready: list[torch.cuda.Event | None] = [None] * len(blocks)  # copy done
        self._done: list[torch.cuda.Event | None] = [None] * len(blocks)  # forward done
        self._fetched = [False] * len(blocks)
        for index, block in enumerate(blocks):
            setattr(block, STREAMED, True)
            block.register_forward_pre_hook(self._pre_hook(index))
            block.register_forward_hook(self._post_hook(index))

    def _pre_hook(self, index: int) -> Any:
        def before(_module: torch.nn.Module, _args: Any) -> None:
            self._fetch(index)  # a no-op when the block before already started it
            event = self._ready[index]
            if event is not None:
                compute = torch.cuda.current_stream(self._device)
                compute.wait_event(event)
                self._weights[index].record_stream(compute)
            self._ready[index], self._fetched[index] = None, False
            count = len(self._weights)
            two_back = self._done[(index - 2) % count]
            if two_back is not None:
                two_back.synchronize()
            following = (index + 1) % count
            if following != index:  # one streamed block: its next copy waits for the next forward
                self._fetch(following)

        return before

    def _post_hook(self, index: int) -> Any:
        def after(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
            self._weights[index].offload()
            if self._stream is not None:
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(torch.cuda.current_stream(self._device))  # type: ignore[no-untyped-call]
                self._done[index] = done

        return after

    def _fetch(self, index: int) -> None:
        if self._fetched[index]:
            return
        self._fetched[index] = True
        if self._stream is None:
            self._weights[index].onload()
            return
        with torch.cuda.stream(self._stream):
            self._weights[index].onload()
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)  # type: ignore[no-untyped-call]
        self._ready[index] = event


def place(pipe: OvisImagePipeline, plan: Plan, device: torch.device) -> None:
    """Move the weights as `plan` says. The pipeline may start on the CPU or on the device."""
    if plan.offload == "none":
        pipe.to(device)
        return
    if plan.offload == "sequential":
        for module in (pipe.text_encoder, pipe.transformer):
            _stream_layers(module, device)
        _move_resident(pipe, device, skip=[pipe.text_encoder, pipe.transformer])
        return
    # Hooks first (they take the CPU copies), then everything else to the device.
    TakingTurns(pipe, device, transformer_travels=plan.offload == "model")
    skip = [pipe.text_encoder]
    if plan.offload == "model":
        skip.append(pipe.transformer)
    elif plan.offload == "group":
        streamed = transformer_blocks(pipe)[plan.resident_blocks :]
        if streamed:
            BlockStreamer(streamed, device)
        skip += streamed
    _move_resident(pipe, device, skip=skip)


def _stream_layers(module: torch.nn.Module, device: torch.device) -> None:
    """diffusers' leaf-level group offloading; on CUDA from pinned memory, one layer copied
    ahead on a side stream."""
    cuda = device.type == "cuda"
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=cuda,
        record_stream=cuda,
        low_cpu_mem_usage=False,
    )


def _move_resident(
    pipe: OvisImagePipeline, device: torch.device, skip: Sequence[torch.nn.Module]
) -> None:
    """Every parameter and buffer not under a module of `skip` to `device`, in place (the hooks
    hold the others' tensors, so a `.to()` of a parent must not replace them)."""
    skipped = {id(t) for module in skip for t in [*module.parameters(), *module.buffers()]}
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in skipped:
                tensor.data = tensor.data.to(device)


def is_streamed(module: torch.nn.Module) -> bool:
    return bool(getattr(module, STREAMED, False))
