"""The CPU inference layer: Linear weights laid out for decoding, and the kernel each product runs on.

Why each choice was made, with its measurements: docs/performance-log.md ("CPU Linear kernels").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ulm.model import FeedForward, activation_layer


class InferenceLinear(nn.Linear):
    """An nn.Linear for CPU inference sharing the parameters of the one it replaces (prepare_for_inference),
    optionally followed by an activation ("relu", "gelu", "gelu_tanh"), fused into the oneDNN kernel.

    Each product goes to the kernel that ran it fastest:
    - several rows (prefill, batched decoding), up to `max_rows`: oneDNN on the packed copy;
    - one row on one thread: MKL over the row-major (in, out) matrix that the column-major weight is, except in
      layers that shrink (in > out), whose short rows stream poorly (oneDNN there);
    - one row on n > 1 threads: split_product, n blocks of the weight shared among the threads (neither library
      shares a matrix-vector product among threads as well);
    - small weights (under PACK_MIN elements, or ONE_ROW_MIN for one row): MKL, whose per-call cost is lower;
    - more than `max_rows` rows: MKL, because oneDNN makes and keeps a kernel (JIT code, ~0.5 MB) for every row
      count it meets, and prefills of varied prompts meet a new one almost every pass.
    bf16 weights (ulm.quantize, "bf16") stay row-major and take oneDNN's packed kernel at every row count, one row
    included (bf16_product).
    """

    POST_OPS = {None: ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
    PACK_MIN, ONE_ROW_MIN = 1 << 16, 1 << 18
    MAX_ROWS = 32  # the default bound on oneDNN's row counts (the server's default batch)

    def __init__(self, linear: nn.Linear, pack: bool, activation: str | None = None, max_rows: int | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max(1, max_rows or self.MAX_ROWS)  # oneDNN runs at most this many rows (one kernel each)
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: tied weights stay tied
        self.bf16 = self.weight.dtype == torch.bfloat16  # oneDNN's packed kernels for every row count
        if self.weight.is_contiguous() and not self.bf16:  # a tied weight is laid out once, by its first module
            self.weight.data = self.weight.data.t().contiguous().t()
        size = self.weight.numel()
        pack = pack and size > self.PACK_MIN
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16) if pack else None
        self.one_row_packed = size > self.ONE_ROW_MIN  # large enough for one row's own kernels: split or oneDNN
        self.act = activation_layer(activation) if activation else nn.Identity()
        self.post_op, self.algorithm = self.POST_OPS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.act.forward, not self.act(...): nn.Module.__call__ costs more than a small product (decoding)
        if torch.is_grad_enabled():
            return self.act.forward(F.linear(x, self.weight, self.bias))
        rows = x.numel() // self.in_features
        if self.bf16:
            return self.bf16_product(x, rows)
        threads, one_row = torch.get_num_threads(), rows == 1
        if one_row and threads > 1 and self.one_row_packed and self.in_features % threads == 0:
            return self.split_product(x, threads)
        if self.packed is not None and rows <= self.max_rows and (not one_row or (
                self.one_row_packed and (self.in_features > self.out_features or threads > 1))):
            return self.packed_product(x)
        return self.act.forward(F.linear(x, self.weight, self.bias))

    def packed_product(self, x: torch.Tensor) -> torch.Tensor:
        # the resolved overload: the op packet's Python dispatch would be paid on every call
        return torch.ops.mkldnn._linear_pointwise.default(x, self.packed, self.bias, self.post_op, [], self.algorithm)

    def bf16_product(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """bf16 weights: oneDNN's packed bf16 kernel for any row count up to max_rows, one row included (GPT-2-small's
        49 products at one row: 11.3 ms packed, 15.1 ms through F.linear, against 15.9 ms of the fp32 layout)."""
        if self.packed is not None and rows <= self.max_rows:
            return self.packed_product(x)
        return self.act.forward(F.linear(x, self.weight, self.bias))

    def split_product(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """One row's product as n blocks of in/n weight rows, shared among n threads (see the class docstring)."""
        K, N = self.in_features, self.out_features
        blocks = self.weight.t().view(n, K // n, N)  # (n, K/n, N): contiguous views, no copy
        y = torch.bmm(x.reshape(n, 1, K // n), blocks).sum(0)  # (n, 1, N) partial sums -> (1, N)
        if self.bias is not None:
            y.add_(self.bias)
        return self.act.forward(y).view(*x.shape[:-1], N)


@torch.no_grad()
def prepare_for_inference(model: nn.Module, pack: bool = True, max_rows: int | None = None,
                          quantize: str | None = None) -> nn.Module:
    """Lay a model's Linear weights out for decoding on the CPU. Returns it, in eval mode; outputs are unchanged.

    Each (out, in) weight becomes a column-major view of a contiguous (in, out) matrix: values, shapes and
    parameters stay (tied weights stay tied), and F.linear hands BLAS a row-major (in, out) operand, which the
    matrix-vector products of one-token decoding read faster, and whose contiguous row blocks several threads
    share between them without a copy. With `pack`, each Linear also keeps a oneDNN-packed copy of its weight for
    products of up to `max_rows` rows (default InferenceLinear.MAX_ROWS; a server: its batch): speed for a second
    copy of the weights in memory. The feed-forward activation moves into its first Linear (one fused kernel).
    Prepare after loading the weights (the packed copies do not follow later changes); leave training models as
    they are. `quantize="int8"`: the Linear layers become dynamic-int8 ones first (ulm.quantize; CPU only). On
    every device, the modules' children are then bound as plain attributes (bind_attributes).
    """
    if quantize is not None:
        from ulm.quantize import quantize_for_inference

        quantize_for_inference(model, quantize)
    if next(model.parameters()).device.type == "cpu":
        pack = pack and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
        for parent in list(model.modules()):
            for name, m in parent.named_children():
                if type(m) is nn.Linear and m.weight.dtype in (torch.float32, torch.bfloat16):
                    fuse = isinstance(parent, FeedForward) and name == "fc"  # fc runs the activation itself
                    setattr(parent, name, InferenceLinear(m, pack, parent.activation if fuse else None, max_rows))
                    if fuse:
                        parent.act = nn.Identity()
    bind_attributes(model)
    return model.eval()


def bind_attributes(model: nn.Module) -> None:
    """Put every module's submodules and parameters in its instance dict, where Python's attribute lookup finds them
    at once. Otherwise each lookup first searches the class hierarchy, fails, and falls back to
    nn.Module.__getattr__: ~0.8 us a lookup, and a decode step makes one per layer, norm and weight it uses (about
    70 in the toy model's 0.27 ms step). nn.Module.__setattr__ keeps the two in step when a module or parameter is
    assigned again; inference models are not changed otherwise after this."""
    for m in model.modules():
        m.__dict__.update(m._modules)
        m.__dict__.update(m._parameters)
