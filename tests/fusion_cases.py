"""concat_weighted_fusion inputs shared by the tests of every backend."""
import dataclasses

import torch


@dataclasses.dataclass
class FusionCase:
    widths: tuple = (16, 16, 16)
    lead: tuple = (6, 5)
    values: tuple | None = None  # widths of separate values, or None: the features are the values
    output: str = "sum"
    bias: bool = True
    strided: bool = False  # rows sliced out of a wider tensor (row stride > width)

    def __str__(self):
        v = "v" + "-".join(map(str, self.values)) if self.values else "f"
        return f"{'-'.join(map(str, self.widths))}x{'x'.join(map(str, self.lead))}{v}{self.output}{'b' if self.bias else ''}{'s' if self.strided else ''}"

    def make(self, dtype, device="cpu"):
        def rows(width):
            if self.strided:
                return torch.randn(*self.lead, width + 8, dtype=dtype, device=device)[..., 3 : 3 + width]
            return torch.randn(*self.lead, width, dtype=dtype, device=device)

        features = [rows(w) for w in self.widths]
        weight = torch.randn(len(self.widths), sum(self.widths), dtype=dtype, device=device) / sum(self.widths) ** 0.5
        bias = torch.randn(len(self.widths), dtype=dtype, device=device) if self.bias else None
        values = [rows(w) for w in self.values] if self.values else None
        return features, weight, bias, values


def composite(features, weight, bias=None, values=None, output="sum"):
    """The eager composite a user would write: cat -> linear -> softmax -> weighted sum."""
    w = torch.softmax(torch.nn.functional.linear(torch.cat(features, -1), weight, bias), dim=-1)
    weighted = [w[..., m : m + 1] * x for m, x in enumerate(values or features)]
    return torch.cat(weighted, -1) if output == "concat" else torch.stack(weighted).sum(0)


FUSION_CASES = [
    FusionCase(),
    FusionCase(widths=(8, 12, 16), output="concat"),
    FusionCase(values=(6, 6, 6)),
    FusionCase(values=(5, 7, 9), output="concat", bias=False),
    FusionCase(widths=(16,), lead=(7,)),
    FusionCase(widths=(4,) * 8, lead=(3, 2, 2)),
    FusionCase(widths=(13, 7), lead=(0,), output="concat"),
    FusionCase(widths=(24, 24), strided=True, values=(16, 16)),
    FusionCase(widths=(33, 65, 17), lead=(129,), output="concat"),
]
