"""What profile() returns, and how it reads as a table."""
import dataclasses
import textwrap

from mmkernels.bench import report as bench_report

CSV_FIELDS = ["recipe", "size", "mode", "stock_ms", "mmkernels_ms", "speedup", "stock_peak_mib", "mmkernels_peak_mib",
              "fused_share", "max_abs_diff"]


def speedup_text(stock_ms: float, mmkernels_ms: float) -> str:
    """"1.23x faster" or "1.23x slower" (bench's wording), "n/a" without two times."""
    if not (stock_ms > 0 and mmkernels_ms > 0):
        return "n/a"
    return bench_report.speedup_text(stock_ms / mmkernels_ms).strip()


@dataclasses.dataclass
class ModuleRow:
    """Inclusive forward time of one module class (nested classes are also counted in their
    parents' rows); `fused` is the number of mmkernels ops that ran inside it."""

    name: str
    stock_calls: int
    mmkernels_calls: int
    stock_ms: float | None
    mmkernels_ms: float | None
    fused: int


@dataclasses.dataclass
class ModeResult:
    """One mode, "fwd" (under no_grad) or "fwd+bwd"; times are medians of the timed calls."""

    mode: str
    stock_ms: float
    mmkernels_ms: float
    stock_peak_mib: float | None
    mmkernels_peak_mib: float | None
    compared: str  # "outputs" or "gradients"
    max_abs_diff: float
    max_abs_value: float  # of the stock side: what the difference is small against
    agree: bool
    fused_calls: dict  # mmkernels op -> calls, in the mmkernels model's profiled call
    fused_share: float  # of that call's time, spent inside mmkernels ops
    sdpa_calls: int  # attention calls of the mmkernels model that still went to torch's SDPA
    stock_top_ops: list  # (op, ms, share of the call), by self time
    mmkernels_top_ops: list

    @property
    def speedup(self) -> float:
        return self.stock_ms / self.mmkernels_ms if self.mmkernels_ms > 0 else float("nan")

    @property
    def speedup_text(self) -> str:
        return speedup_text(self.stock_ms, self.mmkernels_ms)

    @property
    def n_fused(self) -> int:
        return sum(self.fused_calls.values())


@dataclasses.dataclass
class ProfileResult:
    label: str
    device: str  # in words: the CPU model or GPU name
    device_type: str
    dtype: str
    threads: int
    stock: str  # what the stock side runs
    changes: list  # what differs on the mmkernels side
    modes: list  # ModeResult
    modules: list  # ModuleRow, forward
    atol: float
    rtol: float
    notes: list = dataclasses.field(default_factory=list)
    trace: str | None = None

    @property
    def agree(self) -> bool:
        return all(m.agree for m in self.modes)

    def mode(self, name: str) -> ModeResult:
        for m in self.modes:
            if m.mode == name:
                return m
        raise KeyError(f"mode must be one of {[m.mode for m in self.modes]}, got {name!r}")

    def csv_rows(self, recipe: str, size: str) -> list:
        def num(x, digits):
            return "" if x is None else round(x, digits)

        return [dict(recipe=recipe, size=size, mode=m.mode, stock_ms=num(m.stock_ms, 3), mmkernels_ms=num(m.mmkernels_ms, 3),
                     speedup=num(m.speedup, 3), stock_peak_mib=num(m.stock_peak_mib, 1),
                     mmkernels_peak_mib=num(m.mmkernels_peak_mib, 1), fused_share=num(m.fused_share, 4),
                     max_abs_diff=f"{m.max_abs_diff:.3g}") for m in self.modes]

    def __str__(self) -> str:
        timing = "GPU kernel time" if self.device_type == "cuda" else "CPU time"
        lines = [f"{self.label}",
                 f"  on {self.device}, {self.device_type} {self.dtype}, {self.threads} threads",
                 f"  stock:     {self.stock}",
                 f"  mmkernels: {'; '.join(self.changes)}",
                 ""]
        lines += _table(["mode", "stock ms", "mmkernels ms", "speed-up", "stock MiB", "mmkernels MiB", "fused calls",
                         "fused share", "max |diff|", "agree"],
                        [[m.mode, f"{m.stock_ms:.1f}", f"{m.mmkernels_ms:.1f}", m.speedup_text, _mib(m.stock_peak_mib),
                          _mib(m.mmkernels_peak_mib), str(m.n_fused), f"{100 * m.fused_share:.1f}%",
                          f"{m.max_abs_diff:.1e} ({m.compared})", "yes" if m.agree else "NO"] for m in self.modes],
                        right={1, 2, 4, 5, 6, 7})
        lines += ["", "  times: median of the timed calls; MiB: peak extra memory of one call;",
                  f"  fused share: of the mmkernels model's {timing} spent in mmkernels ops; "
                  f"agree: max |diff| <= {self.atol:g} + {self.rtol:g} * max |stock value|"]
        for m in self.modes:
            calls = ", ".join(f"{op.removeprefix('mmkernels::')} x{n}" for op, n in sorted(m.fused_calls.items())) or "none"
            lines.append(f"  {m.mode}: mmkernels ops {calls}; attention left on torch's SDPA: {m.sdpa_calls}")
        if self.modules:
            lines += ["", f"where the forward time went (one profiled call of each, {timing}, ms, inclusive: a class's row",
                      "  includes the classes it calls; * = ran mmkernels ops; calls: stock/mmkernels where they differ)"]
            lines += _table(["module", "calls", "stock ms", "mmkernels ms", "fused"],
                            [[("* " if r.fused else "  ") + r.name, _calls(r), _ms(r.stock_ms), _ms(r.mmkernels_ms),
                              str(r.fused)] for r in self.modules], right={1, 2, 3, 4})
        last = self.modes[-1]
        lines += ["", f"top ops by self {timing}, {last.mode}, one profiled call of each (* = mmkernels op or its autograd)"]
        rows = []
        for i in range(max(len(last.stock_top_ops), len(last.mmkernels_top_ops))):
            row = []
            for ops in (last.stock_top_ops, last.mmkernels_top_ops):
                if i < len(ops):
                    name, ms, share = ops[i]
                    row += [("* " if "mmkernels" in name else "  ") + _short(name), f"{ms:.1f}", f"{100 * share:.1f}%"]
                else:
                    row += ["", "", ""]
            rows.append(row)
        lines += _table(["stock op", "ms", "share", "mmkernels op", "ms", "share"], rows, right={1, 2, 4, 5})
        if self.notes:
            lines.append("")
            lines += [line for n in self.notes for line in textwrap.wrap(f"note: {n}", 118, subsequent_indent="      ")]
        if self.trace:
            lines.append(f"chrome trace: {self.trace}")
        return "\n".join(lines)


def _mib(x):
    return "n/a" if x is None else f"{x:.1f}"


def _calls(row):
    same = row.stock_calls == row.mmkernels_calls
    return str(row.stock_calls) if same else f"{row.stock_calls}/{row.mmkernels_calls}"


def _ms(x):
    return "-" if x is None else f"{x:.1f}"


def _short(name: str, width: int = 46) -> str:
    """Both ends of a long op name say something (GeneratedBackwardFor_..._default), so the middle goes."""
    if len(name) <= width:
        return name
    head = (width - 3) // 2
    return name[:head] + "..." + name[len(name) - (width - 3 - head):]


def _table(header, rows, right=frozenset()):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  " + "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header).rstrip()] + [fmt(r).rstrip() for r in rows]
