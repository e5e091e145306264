"""Attention masks as the kernels take them.

Real multimodal masks are not arbitrary: each text row sees one contiguous span of image tokens
(Llama 3.2 Vision's image intervals, Flamingo's latest image, IDEFICS), a causal row sees a
prefix, and padding cuts either. Such a mask is a pair of per-row key ranges, kv_start <= j <
kv_end, which the kernels walk tile by tile, plus a key_padding_mask for keys that no row sees
(padded tiles inside an image's slot); only masks with other holes, per-head differences or
real biases need the (Lq, Lk) matrix.

to_ranges() turns a boolean or additive mask into those ranges, or says why it can't. Deciding
"is every row one interval" needs one device-to-host sync, so callers convert a mask once and
reuse the decision: RangeCache keeps the last few, keyed on the mask tensor itself (its storage,
shape, strides and version counter). A cached decision never serves stale values, even after
writes that bump no version counter (through .data, a NumPy view, DLPack; any write in inference
mode): the ranges are recomputed from the mask's current values on its device each call (no
sync), with a device-side assert that its structure (one span per row, the holes) is still the
one decided. On the CPU, where reading a mask costs no sync, every call decides afresh.
"""
import weakref

import torch


def visible_keys(mask: torch.Tensor, *, bool_true_means: str) -> torch.Tensor | None:
    """A bool tensor, True where a key is visible, from a boolean mask (bool_true_means:
    "visible" for transformers' masks, "hidden" for nn.MultiheadAttention's) or an additive
    float mask (0: visible; -inf or the dtype's minimum: hidden). None for a float mask with
    other values: a bias, which no range can express."""
    if mask.dtype == torch.bool:
        return mask if bool_true_means == "visible" else ~mask
    if not mask.is_floating_point():
        raise ValueError(f"an attention mask must be bool or float, got {mask.dtype}")
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((hidden | (mask == 0)).all()):
        return None
    return ~hidden


def _spans(visible: torch.Tensor):
    """(first, last, seen, holes, spans_ok) of visible (B, Lq, Lk), on the device: each row's
    first and one-past-last visible key (0, 0 when empty), the keys some row of its batch sees,
    and whether some row's span has a hole / every row is one span less keys no row sees."""
    Lk = visible.shape[-1]
    count = visible.sum(-1)
    first = visible.int().argmax(-1)
    last = Lk - visible.flip(-1).int().argmax(-1)
    nonempty = count > 0
    first, last = torch.where(nonempty, first, 0), torch.where(nonempty, last, 0)
    seen = visible.any(1)  # keys some row of the batch sees
    prefix = torch.nn.functional.pad(seen.cumsum(-1), (1, 0))  # seen keys before j
    in_span = prefix.gather(1, last) - prefix.gather(1, first)
    return first, last, seen, (count < last - first).any(), (count == in_span).all()


def interval_ranges(visible: torch.Tensor, decided_holes: bool | None = None):
    """visible (B, H, Lq, Lk) bool, the same for every head -> ((kv_start, kv_end, key_padding_mask),
    None) or (None, why not). Each row must see one contiguous span of keys, less keys that no row
    of its batch sees (padding inside an image's slot, say): those become key_padding_mask (True =
    hidden; None when no span has such a hole). Empty rows get start = end = 0.

    decided_holes: the structure was decided before (a cached decision): recompute the ranges
    without a host sync, and assert on the device that the structure still holds."""
    B, H, Lq, Lk = visible.shape
    if decided_holes is None and H > 1 and not bool((visible == visible[:, :1]).all()):
        return None, "the mask differs between heads"
    first, last, seen, holes, spans_ok = _spans(visible[:, 0])
    if decided_holes is not None:
        same = spans_ok & (holes == decided_holes)
        if H > 1:
            same = same & (visible == visible[:, :1]).all()
        torch._assert_async(same, "an attention mask was rewritten in place (no version bump) into one of another "
                                  "structure since mmkernels converted it; pass a new mask tensor")
        return (first, last, ~seen if decided_holes else None), None
    holes, spans_ok = torch.stack([holes, spans_ok]).tolist()  # the one host sync
    if not spans_ok:
        return None, "a row's visible keys are not one span (less keys no row sees)"
    return (first, last, ~seen if holes else None), None


def _visible_async(mask, bool_true_means):
    """visible_keys of a mask already decided to be visible/hidden only: no host sync, a device
    assert that a float mask still holds only 0 and -inf."""
    if mask.dtype == torch.bool:
        return visible_keys(mask, bool_true_means=bool_true_means)
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    torch._assert_async((hidden | (mask == 0)).all(), "a float attention mask was rewritten in place (no version bump) "
                                                     "with values other than 0 and -inf; pass a new mask tensor")
    return ~hidden


def _visible_4d(mask, batch, q_len, kv_len, bool_true_means, decided):
    """(visible (B or 1, H or 1, Lq or 1, Lk), None) of a 2-, 3- or 4-D mask, or (None, why not).
    decided: its values were decided before to be visible/hidden only (no sync)."""
    if mask.shape[-1] != kv_len or mask.shape[-2] not in (1, q_len):
        return None, f"a mask of shape {tuple(mask.shape)} for Lq={q_len}, Lk={kv_len}"
    visible = _visible_async(mask, bool_true_means) if decided else visible_keys(mask, bool_true_means=bool_true_means)
    if visible is None:
        return None, "the mask is an additive bias, not just visible/hidden"
    if visible.dim() == 2:
        visible = visible.view(1, 1, *visible.shape)
    elif visible.dim() == 3:
        if visible.shape[0] % batch and visible.shape[0] != 1:
            return None, f"a 3-D mask's first dim must be B or B*H, got {visible.shape[0]} for B={batch}"
        visible = visible.view(batch if visible.shape[0] % batch == 0 else 1, -1, *visible.shape[1:])
    elif visible.dim() != 4:
        return None, f"a {visible.dim()}-D mask"
    if visible.shape[0] not in (1, batch):
        return None, f"a mask for batch {visible.shape[0]}, not {batch}"
    return visible, None


def to_ranges(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, *, bool_true_means: str,
              decided_holes: bool | None = None):
    """A 2-D (Lq, Lk), 3-D (B or B*H, Lq, Lk) or 4-D (B or 1, 1 or H, Lq or 1, Lk) mask ->
    ((kv_start, kv_end, key_padding_mask), None) for the kernels (see interval_ranges; for one
    query row the ranges are None and the mask is all key padding), or (None, why not).
    decided_holes: recompute a decided mask's ranges without a sync."""
    visible, why = _visible_4d(mask, batch, q_len, kv_len, bool_true_means, decided_holes is not None)
    if visible is None:
        return None, why
    if q_len == 1 and visible.shape[1] == 1:
        # One query row (a decoding step): any set of visible keys is a key padding mask; no
        # span to decide, nothing to assert.
        hidden = ~visible[:, 0, 0]
        return (None, None, hidden if hidden.shape[0] == batch else hidden.expand(batch, kv_len)), None
    visible = visible.expand(visible.shape[0], visible.shape[1], q_len, kv_len)
    ranges, why = interval_ranges(visible, decided_holes)
    if ranges is None:
        return None, why
    start, end, hidden = ranges
    if start.shape[0] != batch:  # one mask for the whole batch: stride-0 views, no copy
        start, end = start.expand(batch, q_len), end.expand(batch, q_len)
        hidden = hidden.expand(batch, kv_len) if hidden is not None else None
    return (start, end, hidden), None


MAX_ROW_CLASSES = 4  # fused calls one mask may take


def row_classes(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, *, bool_true_means: str,
                decided: tuple | None = None):
    """A mask whose rows take a few distinct patterns in each batch (a vision encoder's padded
    patches: real rows see every key, padding rows only the real ones; a BOS row that sees
    everything above rows that see two images around a padded tile) -> (calls, None), one
    (kv_start, kv_end, key_padding_mask) per pattern: the rows of the pattern get its first and
    one-past-last key, the other rows an empty range, so the calls' outputs sum to the masked
    attention, each row's from one call. key_padding_mask is None for a pattern without holes.
    (None, why not) for more than MAX_ROW_CLASSES patterns or masks that differ between heads.

    decided: (pattern count, holes per pattern) of an earlier decision: recompute without a
    host sync and assert on the device that the structure still holds."""
    visible, why = _visible_4d(mask, batch, q_len, kv_len, bool_true_means, decided is not None)
    if visible is None:
        return None, why
    if decided is None and visible.shape[1] > 1 and not bool((visible == visible[:, :1]).all()):
        return None, "the mask differs between heads"
    same_heads = (visible == visible[:, :1]).all() if visible.shape[1] > 1 else None
    rows = visible[:, 0].expand(visible.shape[0], q_len, kv_len)
    labels = torch.full(rows.shape[:2], -1, dtype=torch.int8, device=rows.device)
    patterns, firsts, lasts, holes = [], [], [], []
    for c in range(MAX_ROW_CLASSES if decided is None else decided[0]):
        left = labels < 0
        row = left.int().argmax(1)  # each batch's first row without a pattern yet
        pattern = rows.gather(1, row.view(-1, 1, 1).expand(-1, 1, kv_len))[:, 0] & left.any(1, keepdim=True)
        labels = torch.where((rows == pattern[:, None]).all(-1) & left, c, labels)
        count = pattern.sum(-1)
        first = torch.where(count > 0, pattern.int().argmax(-1), 0)
        last = torch.where(count > 0, kv_len - pattern.flip(-1).int().argmax(-1), 0)
        patterns.append(pattern), firsts.append(first), lasts.append(last), holes.append((count < last - first).any())
    complete = (labels >= 0).all()
    if decided is None:
        facts = torch.stack([complete.long(), labels.max().long() + 1, *(h.long() for h in holes)]).tolist()  # the one sync
        if not facts[0]:
            return None, f"the rows take more than {MAX_ROW_CLASSES} patterns of visible keys"
        used, holes = facts[1], [bool(h) for h in facts[2:2 + facts[1]]]
    else:
        used, decided_holes = decided
        same = complete if same_heads is None else complete & same_heads
        for h, was in zip(holes, decided_holes):
            same = same & (h if was else ~h)
        torch._assert_async(same,
                            "an attention mask was rewritten in place (no version bump) into one of another "
                            "structure since mmkernels converted it; pass a new mask tensor")
        holes = decided_holes
    calls = []
    for c in range(used):
        mine = labels == c
        start, end = torch.where(mine, firsts[c][:, None], 0), torch.where(mine, lasts[c][:, None], 0)
        hidden = ~patterns[c] if holes[c] else None
        if start.shape[0] != batch:
            start, end = start.expand(batch, q_len), end.expand(batch, q_len)
            hidden = hidden.expand(batch, kv_len) if hidden is not None else None
        calls.append((start, end, hidden))
    return calls, None


def traced_ranges(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, *, bool_true_means: str):
    """For torch.compile, where no value can decide a branch: to_ranges' ranges computed on the
    device, always, with a device bool that says whether they express the mask exactly (only
    visible/hidden values, the same for every head, one span per row less keys no row sees). The
    caller picks the fused call or its fallback by torch.cond on it. (None, why) for a mask whose
    shape alone rules it out."""
    if mask.shape[-1] != kv_len or mask.shape[-2] not in (1, q_len) or mask.dim() not in (2, 4):
        return None, f"a mask of shape {tuple(mask.shape)} for Lq={q_len}, Lk={kv_len}"
    if mask.dtype == torch.bool:
        visible, exact = (mask if bool_true_means == "visible" else ~mask), mask.new_ones((), dtype=torch.bool)
    elif mask.is_floating_point():
        hidden = mask <= torch.finfo(mask.dtype).min / 2
        visible, exact = ~hidden, (hidden | (mask == 0)).all()
    else:
        return None, f"an attention mask must be bool or float, got {mask.dtype}"
    visible = visible.view(1, 1, *visible.shape) if visible.dim() == 2 else visible
    if visible.shape[0] not in (1, batch):
        return None, f"a mask for batch {visible.shape[0]}, not {batch}"
    visible = visible.expand(visible.shape[0], visible.shape[1], q_len, kv_len)
    first, last, seen, _, spans_ok = _spans(visible[:, 0])
    exact = exact & spans_ok & (visible == visible[:, :1]).all()
    # Keys no row sees are hidden for every row: harmless where no span has such a hole.
    start, end, hidden = first.expand(batch, q_len), last.expand(batch, q_len), (~seen).expand(batch, kv_len)
    return (start, end, hidden, exact), None


class RangeCache:
    """The last few to_ranges() decisions, keyed on the mask tensor: a new mask, or one written to
    in place, is decided again; one rewritten behind its version counter's back is caught (see
    the module's docstring)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict = {}

    @staticmethod
    def _key(mask, batch, q_len, kv_len, bool_true_means):
        return (mask.untyped_storage().data_ptr(), mask.storage_offset(), tuple(mask.shape), tuple(mask.stride()),
                mask.dtype, mask.device, mask._version, batch, q_len, kv_len, bool_true_means)

    # Devices whose masks are decided afresh every call: reading them needs no sync.
    decide_every_call_on = ("cpu",)

    def _uncached(self, mask) -> bool:
        """Decided afresh every call: masks whose reading needs no sync, and inference tensors,
        which have no version counter, so an ordinary in-place refill of a reused buffer could
        not be told from the mask the decision was made for (and on a GPU the device assert
        that catches a changed structure would end the process's CUDA context)."""
        return mask.device.type in self.decide_every_call_on or mask.is_inference()

    def __call__(self, mask, batch, q_len, kv_len, *, bool_true_means):
        convert = lambda holes=None: to_ranges(mask, batch, q_len, kv_len, bool_true_means=bool_true_means,
                                               decided_holes=holes)
        return self._decide("ranges", mask, (batch, q_len, kv_len, bool_true_means), convert,
                            lambda ranges: ranges[2] is not None)

    def classes(self, mask, batch, q_len, kv_len, *, bool_true_means):
        """row_classes(mask, ...), its decision cached as __call__'s is."""
        convert = lambda decided=None: row_classes(mask, batch, q_len, kv_len, bool_true_means=bool_true_means,
                                                   decided=decided)
        return self._decide("classes", mask, (batch, q_len, kv_len, bool_true_means), convert,
                            lambda calls: (len(calls), [hidden is not None for _, _, hidden in calls]))

    def _decide(self, kind, mask, args, convert, structure_of):
        """convert() decides afresh (one host sync on a GPU) and returns (result, why not);
        convert(structure) recomputes this call's values for a structure decided before, without
        a sync. The cache keeps the structure_of(result), never tensors."""
        if torch.compiler.is_compiling():
            # Deciding needs the mask's values, which a traced graph does not have.
            return None, "masks are not converted to ranges inside torch.compile"
        if self._uncached(mask):
            return convert()
        key = (kind, *self._key(mask, *args))
        hit = self._decided(key, mask)
        if hit is None:
            result, why = convert()
            self._store(key, mask, (None if result is None else structure_of(result), why))
            return result, why
        structure, why = hit
        return (None, why) if structure is None else convert(structure)  # this call's values, no sync

    def visible(self, mask, *, bool_true_means):
        """visible_keys(mask), cached: for a float mask, deciding that it is only 0 and -inf
        costs a host sync."""
        if mask.dtype == torch.bool or self._uncached(mask):
            return visible_keys(mask, bool_true_means=bool_true_means)
        key = ("visible", *self._key(mask, 0, 0, 0, bool_true_means))
        hit = self._decided(key, mask)
        if hit is None:
            visible = visible_keys(mask, bool_true_means=bool_true_means)
            self._store(key, mask, (visible is not None,))
            return visible
        return _visible_async(mask, bool_true_means) if hit[0] else None

    def _decided(self, key, mask):
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0]() is mask else None

    def _store(self, key, mask, decision):
        self._entries[key] = (weakref.ref(mask), decision)
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))


# One cache for every layer of the process: a model's layers share their masks, so each mask is
# converted once per forward, not once per layer (and no layer holds weak references, which
# would not pickle).
SHARED = RangeCache(size=16)
