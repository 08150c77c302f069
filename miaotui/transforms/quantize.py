"""quantize_model(model, spec, ctx): swap every decoder-block linear (wq wk wv wo w_gate w_up
w_down) and the output head for a quantized module; the model code never knows.

    rtn           round to nearest: int8 per output channel or group-wise, int4 group-wise
    gptq          GPTQ with act-order, block by block ("true sequential", as the reference's
                  llama_sequential): each block's Hessians come from inputs that already went
                  through the quantized blocks before it, and within a block from the quantized
                  q/k/v before wo, the quantized attention before gate/up, and so on
    awq           AWQ scales searched per block on the same sequential inputs, folded into the
                  norms (q/k/v share one scale, gate/up share one) and into w_up's rows (w_down);
                  wo is only scaled without GQA (see _awq_block); then the clip search and RTN
    w8a8          int8 weights x dynamic per-token int8 activations (torch._int_mm)
    smoothquant   w8a8 after SmoothQuant's scales are folded into the norms (q/k/v, gate/up)

The output head (and the tied embedding) becomes int8 in groups of 32 in every mode: at
49152 x 576 it is a fifth of SmolLM2's weights and of the bytes read per decoded token, and
int8 costs it almost no accuracy. It is a QuantLinear on the int8 kernels (W8A8 too); a tied
embedding reads its rows from the same codes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from miaotui.errors import InvalidRequestError
from miaotui.kernels import pack_int4, pack_int8
from miaotui.model.quant_linear import QuantEmbedding, QuantLinear, W8A8Linear
from miaotui.model.transformer import Block, Transformer
from miaotui.transforms.awq import awq_search_clip, awq_search_scale
from miaotui.transforms.calibrate import LinearStats, calibration_windows
from miaotui.transforms.gptq import gptq_quantize
from miaotui.transforms.quant_math import quantize_int8, quantize_weight, split_groups
from miaotui.transforms.smoothquant import smooth_scales
from miaotui.transforms.spec import QuantSpec, TransformContext

log = logging.getLogger(__name__)

# Linears that read the same input, in the order a block computes them.
INPUT_GROUPS = (
    ("attention.wq", "attention.wk", "attention.wv"),
    ("attention.wo",),
    ("feed_forward.w_gate", "feed_forward.w_up"),
    ("feed_forward.w_down",),
)
BLOCK_LINEARS = tuple(n for group in INPUT_GROUPS for n in group)
SMOOTH_ALPHA = 0.8  # migration strength; the SmoothQuant repo uses 0.8-0.85 for Llama models
HEAD_GROUP = 32  # input columns per scale of the int8 output head (see _quantize_head)
# GPTQ dampening (fraction of mean diag H added to H). The reference uses 0.01; on SmolLM2 with
# a few thousand calibration tokens 0.1 gave lower held-out output error on every projection
# measured (e.g. w_down of block 5: RTN 0.094, damp 0.01 0.088, damp 0.1 0.080; same-domain
# held-out text), and far less overfitting when the calibration text differs from the test text.
# Damping does not cure a domain shift: int4 g128 on wiki text (float 15.75, RTN 23.45) after
# calibrating on the novel scores 24.69 at damp 0.1 and 23.29 at 1.0; on wiki text disjoint from
# the scored text, 21.36 at 0.1 (bench/bench_calibration.py).
GPTQ_DAMP = 0.1
# Act-order (columns by decreasing diag H, static groups): novel, damp 0.1: 24.69 with, 26.33 without.
GPTQ_ACT_ORDER = True
AWQ_SAMPLE_ROWS = 1024  # input rows per linear kept for AWQ's scale and clip searches
CHUNK_WINDOWS = 4  # calibration windows run through a block at once (bounds attention memory)


def quantize_model(model: Transformer, spec: QuantSpec, ctx: TransformContext) -> Transformer:
    """Quantize `model` in place according to `spec`; returns it."""
    if spec.bits not in (4, 8):
        raise InvalidRequestError(f"bits={spec.bits} is not supported; use 4 or 8")
    w8a8 = spec.activations or spec.method == "smoothquant"
    if w8a8 and spec.bits != 8:
        raise InvalidRequestError(f"W8A8 needs bits=8, got bits={spec.bits}")
    with torch.no_grad():
        if spec.method == "gptq":
            _sequential(model, ctx, spec, _gptq_block)
        elif spec.method == "awq":
            _sequential(model, ctx, spec, _awq_block)
        elif spec.method == "smoothquant":
            _sequential(model, ctx, spec, _smooth_block)
        elif spec.method == "rtn":
            for block in _progress(model.layers, ctx.progress, _desc(spec)):
                _rtn_block(block, spec)
        else:
            raise InvalidRequestError(
                f"unknown quantization method {spec.method!r}; use rtn, gptq, awq or smoothquant"
            )
        _quantize_head(model)
    return model


# --- one linear -------------------------------------------------------------------------------


def group_size_for(k: int, spec: QuantSpec) -> int:
    """The group size used for a K-column weight: the spec's, or (with a warning) the largest
    multiple of the kernels' unit (32 for int4, 16 for int8) below it that divides K."""
    unit = 32 if spec.bits == 4 else 16
    g = spec.group_size or k
    if k % g == 0 and g % unit == 0:
        return g
    for cand in range(g - g % unit, 0, -unit):
        if k % cand == 0:
            log.warning("group size %d does not divide K=%d; using %d for this layer", g, k, cand)
            return cand
    raise InvalidRequestError(
        f"no int{spec.bits} group size fits K={k} (need a multiple of {unit} dividing it); "
        f"requested group_size={spec.group_size}"
    )


def quant_linear(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> QuantLinear:
    """A QuantLinear from quant_math codes: int8 (M, K) or uint8 0..15 (M, K)."""
    if codes.dtype == torch.int8:
        return QuantLinear(pack_int8(codes, scale, group_size), _bias(bias))
    return QuantLinear(pack_int4(codes, scale, offset, group_size), _bias(bias))


def _rtn(lin: nn.Linear, spec: QuantSpec, weight: torch.Tensor | None = None) -> QuantLinear:
    w = lin.weight.float() if weight is None else weight
    g = group_size_for(w.shape[1], spec)
    codes, scale, offset = quantize_weight(w, spec.bits, g, spec.symmetric)
    return quant_linear(codes, scale, offset, g, lin.bias)


def _w8a8(lin: nn.Linear) -> W8A8Linear:
    return W8A8Linear.from_float(lin.weight, _bias(lin.bias))


def _bias(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.detach().float()


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _quantize_head(model: Transformer) -> None:
    """int8 in groups of 32 (per row if K % 32 != 0) for the output head and, when tied, the
    embedding that shares it. Groups of 32 as GGUF's Q8_0, which then round-trips exactly; per
    channel cost SmolLM2 +0.3 % perplexity on its own. The head always runs on the int8 kernels,
    also under W8A8: it is one row per sequence in prefill, and in decode the kernel is faster."""
    head = model.output
    if not isinstance(head, nn.Linear) or head.weight.shape[1] % 16:
        return  # already quantized, or no kernel layout fits (K % 16 != 0)
    dtype = model.norm.weight.dtype
    emb = model.tok_embeddings
    tied = getattr(emb, "weight", None) is head.weight
    k = head.weight.shape[1]
    g = HEAD_GROUP if k % HEAD_GROUP == 0 else k
    packed = pack_int8(*quantize_int8(head.weight.float(), g), g)
    model.output = QuantLinear(packed)
    if tied:
        model.tok_embeddings = QuantEmbedding(packed, dtype)
    elif isinstance(emb, nn.Embedding):
        model.tok_embeddings = QuantEmbedding(
            pack_int8(*quantize_int8(emb.weight.float(), g), g), dtype
        )


# --- block-by-block calibration ----------------------------------------------------------------


class _Stop(Exception):
    """Raised by the hook that captures block 0's inputs, to skip the rest of the model."""


class _ScratchCache:
    """KV storage for one block at a time: every layer index maps to the same tensors,
    (re)allocated to the writer's shape, so blocks may differ in KV heads (pruned models)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k is None or self.k.shape[1:] != k.shape[1:] or self.k.dtype != k.dtype:
            self.k = k.new_zeros((self.num_slots, *k.shape[1:]))
            self.v = v.new_zeros((self.num_slots, *v.shape[1:]))
        self.k.index_copy_(0, slots, k)
        self.v.index_copy_(0, slots, v)

    def read(self, layer: int, key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[key_slots], self.v[key_slots]


class LayerwiseInputs:
    """The hidden states entering the current block for every calibration chunk. Created from
    the model's own embedding path (block 0's inputs are captured by a hook), then advanced
    through each block after it is quantized, so later blocks calibrate on quantized inputs."""

    def __init__(self, model: Transformer, windows: list[list[int]]):
        from miaotui.model.attention import build_attention_metadata
        from miaotui.model.standalone import BLOCK

        self.chunks: list[tuple[torch.Tensor, dict, object, _ScratchCache]] = []
        device = model.rotary.cos.device
        c = model.config
        for i in range(0, len(windows), CHUNK_WINDOWS):
            ws = windows[i : i + CHUNK_WINDOWS]
            tables, nxt = [], 1  # block 0 stays the padding block, as in forward_sequences
            for w in ws:
                n = -(-len(w) // BLOCK)
                tables.append(list(range(nxt, nxt + n)))
                nxt += n
            meta = build_attention_metadata(
                [0] * len(ws), [len(w) for w in ws], tables, BLOCK, c.sliding_window, device
            )
            ids = torch.tensor([t for w in ws for t in w], device=device)
            cache = _ScratchCache(nxt * BLOCK)
            captured: list = []

            def grab(_module, args, captured=captured):
                captured.append(args)
                raise _Stop

            handle = model.layers[0].register_forward_pre_hook(grab)
            try:
                model.hidden_states(ids, meta, cache)
            except _Stop:
                pass
            finally:
                handle.remove()
            x, rope, meta, _ = captured[0]
            self.chunks.append((x.detach().clone(), rope, meta, cache))
        self.num_rows = sum(x.shape[0] for x, *_ in self.chunks)

    def run(self, block: Block) -> list[torch.Tensor]:
        """The block's outputs for every chunk."""
        return [block(x, rope, meta, cache) for x, rope, meta, cache in self.chunks]

    def advance(self, block: Block) -> None:
        """Replace the stored inputs by the block's outputs (the next block's inputs)."""
        outs = self.run(block)
        self.chunks = [(o, r, m, c) for o, (_, r, m, c) in zip(outs, self.chunks)]

    def record(
        self, block: Block, names: Iterable[str], gram: bool = False, sample_rows: int = 0
    ) -> dict[str, LinearStats]:
        """Input statistics of the named linears of `block` over every chunk: absmax always,
        X^T X with `gram`, and about `sample_rows` rows spread evenly over the calibration
        tokens. Each chunk's pass stops once the last of the named linears (in the order the
        block computes them) has seen its input: nothing after it is needed."""
        stride = max(1, self.num_rows // sample_rows) if sample_rows else 0
        names = list(names)
        stats = {n: LinearStats() for n in names}
        last = max(names, key=BLOCK_LINEARS.index)
        handles = [
            block.get_submodule(n).register_forward_hook(
                _input_hook(stats[n], gram, stride, stop=n == last)
            )
            for n in names
        ]
        try:
            for x, rope, meta, cache in self.chunks:
                try:
                    block(x, rope, meta, cache)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return stats


def _input_hook(s: LinearStats, gram: bool, stride: int, stop: bool = False):
    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (N, K)
        s.n += x.shape[0]
        amax = x.abs().amax(0)
        s.absmax = amax if s.absmax is None else torch.maximum(s.absmax, amax)
        if gram:
            # float32 per chunk (1024 rows; the reference accumulates H in float32 throughout),
            # summed in float64: a float64 matmul per chunk was most of GPTQ's time at K = 1536.
            g = (x.T @ x).double()
            s.gram = g if s.gram is None else s.gram + g
        if stride:
            s.sample.append(x[::stride].clone())
        if stop:
            raise _Stop

    return hook


def _sequential(model: Transformer, ctx: TransformContext, spec: QuantSpec, per_block) -> None:
    windows = calibration_windows(ctx.tokenizer, ctx.calibration)
    if not windows:
        raise InvalidRequestError(
            f"calibration text {ctx.calibration.text_path} is shorter than one window of "
            f"{ctx.calibration.window} tokens"
        )
    inputs = LayerwiseInputs(model, windows)
    for block in _progress(model.layers, ctx.progress, _desc(spec)):
        per_block(block, inputs, spec)
        inputs.advance(block)


def _gptq_block(block: Block, inputs: LayerwiseInputs, spec: QuantSpec) -> None:
    """Quantize the block group by group, each group's Hessian measured after the groups before
    it were quantized (the reference's true-sequential order)."""
    for group in INPUT_GROUPS:
        lins = {n: block.get_submodule(n) for n in group}
        lins = {n: m for n, m in lins.items() if isinstance(m, nn.Linear)}
        if not lins:
            continue
        stats = inputs.record(block, [next(iter(lins))], gram=True)
        h = next(iter(stats.values())).hessian()
        # GPTQ treats rows independently given H, so linears that share the input are quantized
        # as one stacked weight: one inverse Hessian and one column sweep instead of three.
        weights = [lin.weight.float() for lin in lins.values()]
        g = group_size_for(weights[0].shape[1], spec)
        with _one_thread():
            codes, scale, offset, _ = gptq_quantize(
                torch.cat(weights), h, spec.bits, g, spec.symmetric, GPTQ_ACT_ORDER, GPTQ_DAMP
            )
        rows = [w.shape[0] for w in weights]
        parts = zip(codes.split(rows), scale.split(rows), _split(offset, rows))
        for (name, lin), (c, sc, off) in zip(lins.items(), parts):
            _replace(block, name, quant_linear(c, sc.contiguous(), off, g, lin.bias))


def _split(t: torch.Tensor | None, rows: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(rows) if t is None else [p.contiguous() for p in t.split(rows)]


def _awq_block(block: Block, inputs: LayerwiseInputs, spec: QuantSpec) -> None:
    """Search and fold all of the block's scales, then clip and quantize its linears.

    wo is scaled only without GQA: its scale would have to be folded into wv's rows, and under
    GQA each wv row feeds n_heads / n_kv_heads columns of wo, which would all need one scale
    (the reference skips it when the shapes differ, too). wo still gets the clip search."""
    if not _all_float(block):
        return _rtn_block(block, spec)
    attn, ffn = block.attention, block.feed_forward
    firsts = [g[0] for g in INPUT_GROUPS]
    stats = inputs.record(block, firsts, sample_rows=AWQ_SAMPLE_ROWS)
    x = {name: stats[group[0]].inputs() for group in INPUT_GROUPS for name in group}
    bits, sym = spec.bits, spec.symmetric

    def scale_group(linears: list[nn.Linear], xs: torch.Tensor) -> torch.Tensor:
        w = torch.cat([lin.weight.float() for lin in linears])
        g = group_size_for(w.shape[1], spec)
        s = awq_search_scale(w, xs, bits, g, sym)
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        return s

    s = scale_group([attn.wq, attn.wk, attn.wv], x["attention.wq"])
    block.attention_norm.weight.div_(s.to(block.attention_norm.weight.dtype))
    for n in INPUT_GROUPS[0]:
        x[n] = x[n] / s
    if attn.n_heads == attn.n_kv_heads and attn.wv.weight.shape[0] == attn.wo.weight.shape[1]:
        s = scale_group([attn.wo], x["attention.wo"])
        attn.wv.weight.div_(s[:, None].to(attn.wv.weight.dtype))
        if attn.wv.bias is not None:
            attn.wv.bias.div_(s.to(attn.wv.bias.dtype))
        x["attention.wo"] = x["attention.wo"] / s
    s = scale_group([ffn.w_gate, ffn.w_up], x["feed_forward.w_gate"])
    block.ffn_norm.weight.div_(s.to(block.ffn_norm.weight.dtype))
    for n in INPUT_GROUPS[2]:
        x[n] = x[n] / s
    s = scale_group([ffn.w_down], x["feed_forward.w_down"])
    ffn.w_up.weight.div_(s[:, None].to(ffn.w_up.weight.dtype))
    x["feed_forward.w_down"] = x["feed_forward.w_down"] / s

    for name in BLOCK_LINEARS:
        lin = block.get_submodule(name)
        w = lin.weight.float()
        g = group_size_for(w.shape[1], spec)
        # The reference skips clipping q and k: their errors meet in q k^T, not in a sum.
        if name not in ("attention.wq", "attention.wk"):
            bound = awq_search_clip(w, x[name], bits, g, sym)[..., None]  # (M, ng, 1)
            wg = split_groups(w, g)
            w = torch.minimum(torch.maximum(wg, -bound), bound).reshape(w.shape)
        _replace(block, name, _rtn(lin, spec, w))


def _smooth_block(block: Block, inputs: LayerwiseInputs, spec: QuantSpec) -> None:
    """SmoothQuant: fold s = max|X|^a / max|W|^(1-a) into the two norms, then W8A8 everything.
    wo and w_down are not smoothed (no norm in front of them), as in the reference."""
    if not _all_float(block):
        return _rtn_block(block, spec)
    stats = inputs.record(block, ["attention.wq", "feed_forward.w_gate"])
    pairs = (
        (block.attention_norm, INPUT_GROUPS[0], stats["attention.wq"]),
        (block.ffn_norm, INPUT_GROUPS[2], stats["feed_forward.w_gate"]),
    )
    for norm, names, st in pairs:
        lins = [block.get_submodule(n) for n in names]
        w_absmax = torch.stack([lin.weight.float().abs().amax(0) for lin in lins]).amax(0)
        s = smooth_scales(st.absmax, w_absmax, SMOOTH_ALPHA)
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.dtype))
    for name in BLOCK_LINEARS:
        _replace(block, name, _w8a8(block.get_submodule(name)))


def _all_float(block: Block) -> bool:
    """Scales can only be folded into dense float weights (not e.g. a pruned CSR layer)."""
    dense = all(isinstance(block.get_submodule(n), nn.Linear) for n in BLOCK_LINEARS)
    if not dense:
        log.warning(
            "block %d is not all nn.Linear: no calibrated scales, RTN", block.attention.layer
        )
    return dense


def _rtn_block(block: Block, spec: QuantSpec) -> None:
    w8a8 = spec.activations or spec.method == "smoothquant"
    for name in BLOCK_LINEARS:
        lin = block.get_submodule(name)
        if isinstance(lin, nn.Linear):
            _replace(block, name, _w8a8(lin) if w8a8 else _rtn(lin, spec))


@contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ's column loop is thousands of small ops; OpenMP hand-offs dominate them (a
    1536 x 576 layer: 0.3 s on one thread, 13 s on two of this shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _desc(spec: QuantSpec) -> str:
    return f"{spec.method} int{spec.bits}"


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block", leave=False)
