"""What a kernel's SASS says about its efficiency, read without a GPU: the main loop's instruction
count, its tensor-core work and whether its loads are asynchronous.

The SASS comes from nvdisasm (bundled with Triton) over a cubin. A loop is a backward branch:
the instructions from its target label to the branch. The main loop of a kernel is its innermost
loop with tensor-core instructions and the most tensor FLOPs per instruction: for our kernels the
full-tile loop (their partial-tile loops run on at most two tiles per block), for the anchor its
only loop. Counts are static, over every path of the loop body except nested loops (the rare
non-finite paths run one row at a time and are not the main loop's work).

FLOPs are per warp: an HMMA is issued by each warp for its own m16n8kK tile; an HGMMA mKnNkK is
issued by each of the four warps of a warpgroup for the warpgroup's tile, so a quarter of it is
counted per warp. flop_per_instr = the loop's per-warp tensor FLOPs / its instructions.
"""
import dataclasses
import os
import re
import subprocess
import tempfile

import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_FUNCTION = re.compile(r"^\s*\.text\.(\S+):")
_HMMA = re.compile(r"^HMMA\.16(8)(\d+)")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
ASYNC_LOADS = ("LDGSTS", "UTMALDG", "UBLKCP")  # cp.async, TMA tile and bulk copies


@dataclasses.dataclass
class Instruction:
    opcode: str
    operands: str


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    instructions: int = 0  # in the body, nested loops excluded
    mma: str = ""  # "HGMMA", "HMMA" or "" (the widest kind in the body)
    mma_count: int = 0
    flops: int = 0  # per warp, per iteration
    async_loads: bool = False
    sync_loads: int = 0  # plain global loads (LDG) in the body

    @property
    def flop_per_instr(self) -> float:
        return self.flops / self.instructions if self.instructions else 0.0


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


def functions(sass: str) -> dict[str, list[str]]:
    """The SASS lines of each function, by (mangled) name."""
    out, current = {}, None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    return out


def parse(lines: list[str]) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions in order, and each label's index (the instruction after it)."""
    instructions, labels = [], {}
    for line in lines:
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instructions)
            continue
        m = _INSTRUCTION.match(line)
        if m:
            instructions.append(Instruction(m.group(2), m.group(3)))
    return instructions, labels


def mma_flops(opcode: str) -> tuple[str, int]:
    """(kind, per-warp FLOPs) of a tensor-core instruction; ("", 0) for any other."""
    m = _HGMMA.match(opcode)
    if m:
        M, N, K = (int(x) for x in m.groups())
        return "HGMMA", 2 * M * N * K // 4
    m = _HMMA.match(opcode)
    if m:
        return "HMMA", 2 * 16 * int(m.group(1)) * int(m.group(2))
    return "", 0


def loops(instructions: list[Instruction], labels: dict[str, int]) -> list[Loop]:
    spans = []
    for i, ins in enumerate(instructions):
        if ins.opcode.startswith("BRA"):
            m = _BRANCH_TARGET.search(ins.operands)
            if m and m.group(1) in labels and labels[m.group(1)] <= i:
                spans.append((labels[m.group(1)], i))
    result = []
    for start, end in spans:
        nested = [(s, e) for s, e in spans if start <= s and e <= end and (s, e) != (start, end)]
        loop = Loop(start, end)
        for i in range(start, end + 1):
            if any(s <= i <= e for s, e in nested):
                continue
            op = instructions[i].opcode
            loop.instructions += 1
            kind, flops = mma_flops(op)
            if kind:
                loop.mma_count += 1
                loop.flops += flops
                loop.mma = "HGMMA" if "HGMMA" in (kind, loop.mma) else kind
            loop.async_loads |= op.startswith(ASYNC_LOADS)
            loop.sync_loads += op.startswith("LDG.")
        result.append(loop)
    return result


def main_loop(sass_lines: list[str]) -> Loop | None:
    """The innermost tensor-core loop with the most FLOPs per instruction (None: no such loop)."""
    instructions, labels = parse(sass_lines)
    candidates = [loop for loop in loops(instructions, labels) if loop.mma_count]
    return max(candidates, key=lambda loop: loop.flop_per_instr, default=None)


def kernel_mma(sass_lines: list[str]) -> str:
    """The widest tensor-core instruction kind anywhere in the kernel."""
    kinds = {mma_flops(ins.opcode)[0] for ins in parse(sass_lines)[0]}
    return "HGMMA" if "HGMMA" in kinds else ("HMMA" if "HMMA" in kinds else "")
