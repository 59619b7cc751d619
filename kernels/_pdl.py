"""Programmatic dependent launch (PDL, Hopper and newer): the next kernel starts while this one finishes.

At batch 1 a decode step is ~230 small kernels in a row, and each one's start waits for the previous one to end
completely: its last blocks drain, the GPU launches the next grid, its blocks ramp up and only then issue their
first loads. A few µs per kernel, which at batch 1 is as much as the kernels' own work. With PDL a kernel may be
launched *before* its predecessor has finished, and says itself where it needs the predecessor's results:

* ``pdl_trigger()`` (``griddepcontrol.launch_dependents``): once every block of this grid has passed it, the
  GPU may launch the next grid in the stream (if that grid was launched with PDL allowed);
* ``pdl_wait()`` (``griddepcontrol.wait``): blocks until every grid this one depends on has completed and its
  memory writes are visible. Everything before it must not touch the predecessor's outputs -- nor write what the
  predecessor may still read; loading weights, which nobody writes, is exactly what fits there.

So a gemv issues its weight loads, then waits, then reads x: its weights stream in while the previous
kernel's tail runs. A grid launched with PDL allowed *must* call ``pdl_wait()`` in every block before
reading or writing shared data (completion of a grid that never waited would not imply completion of the grids
before it); :func:`mark` records that a kernel does, and :mod:`kernels._launch` allows PDL for marked kernels
only, while ``kernels._launch.PDL`` is on (the default). A CUDA graph captured from such launches keeps
the programmatic edges.

Both instructions exist from sm_90 on. The intrinsics ask NVVM for the target architecture
(``__nvvm_reflect("__CUDA_ARCH")``, the mechanism libdevice uses) and emit the instruction only where it is
900 or more: the same kernel source compiles for sm_80 (no instruction, no PDL: the launcher never asks for it
there) and for sm_90. In numba's CUDA simulator both are no-ops (threads of a simulated grid run to the end
before the next grid starts).
"""

from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic

from kernels._env import simulator_enabled

PDL_MIN_CC = (9, 0)
MARKED: list = []  # every dispatcher mark() was given (tests check that each one's source waits)
_REFLECT_NAME = "__minivllm_reflect_cuda_arch"


def _cuda_arch(builder):
    """``__nvvm_reflect("__CUDA_ARCH")``: NVVM replaces the call by the target's architecture (e.g. 900)."""
    module = builder.module
    i8p = ir.IntType(8).as_pointer()
    reflect = module.globals.get("__nvvm_reflect")
    if reflect is None:
        reflect = ir.Function(module, ir.FunctionType(ir.IntType(32), [i8p]), "__nvvm_reflect")
    name = module.globals.get(_REFLECT_NAME)
    if name is None:
        text = bytearray(b"__CUDA_ARCH\0")
        array = ir.ArrayType(ir.IntType(8), len(text))
        name = ir.GlobalVariable(module, array, _REFLECT_NAME, addrspace=4)  # constant memory, as libdevice's
        name.initializer = ir.Constant(array, text)
        name.global_constant = True
        name.linkage = "private"
    zero = ir.Constant(ir.IntType(32), 0)
    return builder.call(reflect, [builder.addrspacecast(builder.gep(name, [zero, zero]), i8p)])


def _hopper_statement(text: str):
    """An intrinsic that emits the PTX statement ``text`` on sm_90 and newer and nothing on older targets."""
    def typer(typingctx):
        def codegen(context, builder, signature, args):
            arch = _cuda_arch(builder)
            with builder.if_then(builder.icmp_signed(">=", arch, ir.Constant(ir.IntType(32), 900))):
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True)
                builder.call(asm, [])
            return context.get_dummy_value()

        return types.void(), codegen

    return intrinsic(typer)


pdl_wait = _hopper_statement("griddepcontrol.wait;")
pdl_trigger = _hopper_statement("griddepcontrol.launch_dependents;")


def mark(dispatcher):
    """Record that every block of ``dispatcher``'s kernel calls :func:`pdl_wait` before it touches data another
    kernel writes or reads: it may be launched with PDL allowed. Returns the dispatcher."""
    dispatcher.pdl = True
    MARKED.append(dispatcher)
    return dispatcher


def _nothing() -> None:
    """The simulator runs one grid at a time: nothing to wait for, nobody to let start early."""


if simulator_enabled():
    pdl_wait = pdl_trigger = _nothing
