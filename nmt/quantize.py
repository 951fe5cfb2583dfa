"""int8 decoding on the CPU: a dynamically quantized copy of a trained model.

PyTorch's dynamic quantization stores the weights of every ``nn.Linear`` (and, for GNMT,
every ``nn.LSTM``) as int8 and quantizes the activations on the fly, call by call, so it
needs no calibration data. It does not see the output projection, which is ``F.linear``
on the tied embedding matrix and the largest matrix product of a decoding step (~40% of
the decoder's multiply-adds at d256 / 8k vocabulary); the copy gets an int8
``nn.Linear`` holding that matrix in the model's ``output_projection`` seam. The
embedding lookup itself stays float32.

The activations' scale is taken over the whole input tensor of a layer, that is over
every sentence (and beam) of a batch, so an int8 translation can change slightly with
what else is in its batch; float32 decoding does not depend on it.

``OutputRows`` gives the output layer over some vocabulary rows only (a shortlist,
nmt/shortlist.py), in float32 or int8: the int8 rows keep their own scales, so they give
the logits the whole int8 projection gives at those rows.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nmt.errors import NmtError
from nmt.models.base import Seq2Seq


def _tied_projection(embedding: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is a copy of the (V, D) embedding matrix."""
    vocab, dim = embedding.shape
    linear = nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        linear.weight.copy_(embedding)
    return linear


def quantize_int8(model: Seq2Seq, device: str | torch.device = "cpu") -> Seq2Seq:
    """An int8 copy of ``model``, in eval mode, to decode on ``device``; ``model`` is unchanged.

    Only the CPU has these int8 kernels: any other device is refused.
    """
    if torch.device(device).type != "cpu":
        raise NmtError(f"int8 decoding runs on the CPU only (PyTorch's dynamic quantization), "
                       f"not on {device}; drop --int8, or decode on the CPU (CUDA_VISIBLE_DEVICES=)")
    if not hasattr(model, "output_projection") or not isinstance(getattr(model, "embed", None), nn.Embedding):
        raise NmtError(f"int8: a {type(model).__name__} has no tied output projection to quantize")
    model = copy.deepcopy(model).cpu().eval()
    model.output_projection = _tied_projection(model.embed.weight)
    # Per-channel weight scales: one per output row, so that a vocabulary entry (or a
    # hidden unit) with small weights keeps its resolution beside one with large weights.
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on import and on every call;
        # the dynamic int8 kernels it uses are still those of this torch.
        warnings.filterwarnings("ignore", message=r".*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*deprecated", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = {nn.Linear: per_channel_dynamic_qconfig, nn.LSTM: per_channel_dynamic_qconfig}
        quantize_dynamic(model, qconfig, dtype=torch.qint8, inplace=True)
    return model


class OutputRows:
    """A model's output layer over some vocabulary rows: ``OutputRows(model)(rows)`` is a function
    of features (..., D) giving ``model.logits(features)[..., rows]``, computed over ``rows`` alone.

    Float32: the rows of ``output_weight()``. int8 (``quantize_int8``'s copy, whose
    ``output_projection`` is a dynamically quantized ``nn.Linear``): the int8 rows with their
    per-row scales, packed for the int8 kernel, which then computes the same integer products
    and the same activation scale (taken over the features alone) as the whole projection.
    The int8 matrix is unpacked once, here; selecting and packing rows is per call, i.e. per
    batch of a shortlist.
    """

    def __init__(self, model: Seq2Seq):
        projection = getattr(model, "output_projection", None)
        self.weight = model.output_weight() if projection is None else None  # (V, D) float32
        if projection is not None:
            weight = projection.weight()  # (V, D) int8, one scale per row
            self.values = weight.int_repr()
            self.scales, self.zero_points = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
            # As the module's own forward: its format version 4 on quantizes activations to 7 bits.
            self.reduce_range = projection.version is not None and projection.version >= 4

    def __call__(self, rows: torch.Tensor):
        if self.weight is not None:
            weight = self.weight.index_select(0, rows)  # (R, D)
            return lambda features: F.linear(features, weight)
        picked = torch._make_per_channel_quantized_tensor(
            self.values.index_select(0, rows), self.scales.index_select(0, rows),
            self.zero_points.index_select(0, rows), 0)  # (R, D) int8
        packed = torch.ops.quantized.linear_prepack(picked, None)
        reduce_range = self.reduce_range
        return lambda features: torch.ops.quantized.linear_dynamic(features, packed, reduce_range=reduce_range)
