"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step.

At batch 1 a decode step is about ten kernels per layer, and each one's programs
start only after the previous kernel has finished and drained: the GPU's memory
pipe idles at every boundary and through every small kernel (norm, rotary,
attention), while the step's time is the time to stream the weights. A kernel
launched with PDL (Hopper and newer) may start while its predecessor still runs.
Here every such kernel first does only what needs nothing from its predecessor
(the skinny linear kernel pulls its first weight slices into the L2 cache), then
waits (``griddepcontrol.wait``) until the predecessor has completed and its writes
are visible, and only then reads an activation or writes anything; right after,
it lets its own successor launch. A kernel that waited has a predecessor that
waited, so every earlier kernel has completed too: the order of memory effects
is the order without PDL. Kernels launched without PDL (torch's) wait as usual.

With ``MII_PDL_EARLY_RELEASE=on`` the small kernels between two skinny linear
kernels (``launch_options(..., small=True)``) let their successor launch before
they wait: the next linear kernel's programs then take the SMs that the previous
one frees in its tail and prefetch their weights while the small kernel waits and
runs. Releasing early changes only when a successor's programs start, never what
they may read before their own wait, and a kernel releases only once all of its
programs have started, so a successor never holds an SM its predecessor needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii import envs
from mii.ops.dispatch import dependent_launch_enabled

try:  # Triton 3.4+; older versions launch every kernel without PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


# Values of a kernel's ``PDL`` constexpr (``launch_options``).
OFF, WAIT_THEN_RELEASE, RELEASE_THEN_WAIT = 0, 1, 2


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has completed (its writes visible),
    and let the next kernel launch: after the wait, or before it where ``PDL`` is
    ``RELEASE_THEN_WAIT``. A no-op without."""
    if PDL == 2:  # RELEASE_THEN_WAIT (Triton reads no module globals here)
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(pointers):
    """Ask the memory system to bring the 128-byte lines at ``pointers`` into the
    L2 cache; nothing waits for them."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // dummy $0",
        "=r,l",
        [pointers],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def launch_options(device: torch.device, small: bool = False) -> dict:
    """Keyword arguments for a kernel taking a ``PDL`` constexpr: ``PDL`` and, when
    on, Triton's ``launch_pdl`` launch attribute. ``small``: a kernel of the decode
    chain whose successor may launch before it waits (``MII_PDL_EARLY_RELEASE``)."""
    if not (AVAILABLE and dependent_launch_enabled(device)):
        return {"PDL": OFF}
    early = small and envs.PDL_EARLY_RELEASE.get() == "on"
    return {"PDL": RELEASE_THEN_WAIT if early else WAIT_THEN_RELEASE, "launch_pdl": True}
