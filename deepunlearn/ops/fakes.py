"""Shape-only (fake) kernels of the extension's ops, so that torch.compile and
torch.library.opcheck can trace them without running them."""
from __future__ import annotations

import torch


def register_fakes() -> None:
    """Register one fake kernel per op; called once, after ``deepunlearn._C`` registered the ops."""

    @torch.library.register_fake("deepunlearn::linear_cov_accumulate_")
    def _(cov, x, tile=0, split_k=0):
        return None

    @torch.library.register_fake("deepunlearn::conv_cov_accumulate_")
    def _(cov, x, kernel, stride, padding, dilation, form="auto", chunk_elements=0):
        return None

    @torch.library.register_fake("deepunlearn::projected_edit")
    def _(w, m_r, m_f):
        torch._check(w.dim() == 3 and m_r.shape == m_f.shape and m_r.shape[-1] == w.shape[-1])
        return torch.empty_like(w)

    @torch.library.register_fake("deepunlearn::symmetric_eigh")
    def _(a):
        torch._check(a.dim() == 3 and a.shape[1] == a.shape[2])
        # the kernels return the eigenvectors as the transpose of a contiguous stack, as torch.linalg.eigh does
        return a.new_empty(a.shape[:2]), torch.empty_like(a, memory_format=torch.contiguous_format).transpose(-2, -1)
