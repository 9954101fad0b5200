"""The compiled extension and its seams.

* :mod:`.loader`: loads ``deepunlearn._C`` once, says what it holds (:func:`extension_info`), and
  answers whether an op has a kernel for a device (:func:`has_op`); :func:`pure_path` switches
  every op to its pure-PyTorch twin for a block.
* :mod:`.fakes`: the ops' shape-only kernels, for torch.compile and opcheck.
* :mod:`.covariance`: ``C += Σ x xᵀ`` of linear rows and conv patches.
* :mod:`.edit`: the fused weight edit from formed projections.
* :mod:`.eigh`: eigendecompositions of stacks of symmetric matrices, one call per stack.

Every seam runs the op when it has a kernel for the input's device, else its pure twin.
"""
from .loader import extension_info, has_op, library, loaded, pure_path

__all__ = ["extension_info", "has_op", "library", "loaded", "pure_path"]
