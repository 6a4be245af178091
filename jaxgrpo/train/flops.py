"""Matmul FLOPs of a whole program, loops included: from its jaxpr (global shapes) and from its
compiled HLO (one device's shapes).

XLA's ``cost_analysis()`` counts the body of a loop once, so for a program made of scans (the
train step's minibatch, micro-batch, log-prob and layer loops) it under-counts by the loops'
trip counts. These counters walk the program instead and multiply every loop body by its trip
count. They count matrix products only (``dot_general`` in a jaxpr; ``dot`` and
``convolution`` in HLO, inside fusions too): ``2 * prod(output) * prod(contracted)``, the work
that dominates a transformer. Elementwise work is not counted, nor are Pallas kernels (a
``pallas_call`` / TPU custom call: e.g. splash attention), on both sides alike.

Comparing the two tells whether a partitioned program repeats work: with ``D`` devices and no
replication, ``hlo_matmul_flops(compiled text) ~= jaxpr_matmul_flops(jaxpr) / D``.
"""

from __future__ import annotations

import functools
import math
import re

__all__ = ["hlo_matmul_flops", "jaxpr_matmul_flops"]


# ---- jaxpr (global shapes) ----------------------------------------------------------------------


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value):
    from jax.extend import core as jex_core

    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr with its global shapes, loops unrolled.

    ``scan`` bodies count ``length`` times; ``cond`` counts its costliest branch; a
    ``shard_map`` body (per-shard shapes) counts once per shard of its mesh; ``while`` bodies
    (unknown trip count) count once; every other sub-jaxpr (``pjit``, ``remat``, custom
    derivatives) counts once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "pallas_call":
            continue
        if name == "cond":
            total += max((jaxpr_matmul_flops(b) for b in eqn.params["branches"]), default=0.0)
            continue
        inner = sum(jaxpr_matmul_flops(j) for k, v in eqn.params.items()
                    if k not in ("branches",) for j in _sub_jaxprs(v))
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "shard_map":
            inner *= math.prod(eqn.params["mesh"].shape.values())
        total += inner
    return total


# ---- compiled HLO (one device) ------------------------------------------------------------------

_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
                       r"(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)(?P<attrs>.*)$")
_END_RE = re.compile(r"^\}(?:,\s*[a-z_]+=.*)?\s*$")
_SHAPE_RE = re.compile(r"^[a-z]+\d*\[(?P<dims>[\d,]*)\]")


def _dims(type_text: str) -> tuple[int, ...] | None:
    m = _SHAPE_RE.match(type_text)
    if m is None:
        return None
    return tuple(int(d) for d in m.group("dims").split(",") if d)


def _parse(hlo_text: str):
    comps: dict[str, list] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        m = _COMP_RE.match(line.strip()) if current is None else None
        if m is not None:
            current = m.group("name")
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        # A computation ends at a ``}`` in column 0, possibly with attributes after it (``},
        # execution_thread="sparsecore"`` on TPU).
        # (A multi-line custom call's backend config has continuation lines starting ``}}``.)
        if current is not None and _END_RE.match(line):
            current = None
            continue
        if current is not None:
            im = _INSTR_RE.match(line)
            if im is not None:
                comps[current].append(im.groupdict())
    return comps, entry


def _args(ins) -> list[str]:
    return [a.strip().lstrip("%") for a in ins["args"].split(",") if a.strip()]


def _const(ins) -> int | None:
    if ins is None or ins["op"] != "constant":
        return None
    c = re.fullmatch(r"\s*(-?\d+)\s*", ins["args"])
    return int(c.group(1)) if c else None


def _through(name: str, by_name: dict):
    """The instruction ``name`` stands for, looking through copies and bitcasts."""
    ins = by_name.get(name)
    while ins is not None and ins["op"] in ("copy", "bitcast", "convert") and _args(ins):
        ins = by_name.get(_args(ins)[0])
    return ins


def _tuple_index(ins) -> int | None:
    m = re.search(r"index=(\d+)", ins["attrs"]) if ins is not None else None
    return int(m.group(1)) if m and ins["op"] == "get-tuple-element" else None


def _trip_count(attrs: str, cond: list, comps: dict, body: list | None = None,
                init=None, caller: dict | None = None) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count`` when it states one, else that of a
    ``counter < N`` condition with a constant ``N`` (the form ``lax.scan`` lowers to), the
    counter starting from its constant initial value in ``init`` (the loop's operand, a tuple in
    ``caller``; 0 when not constant) and stepping by the constant the body adds to it (1 when not
    found; the TPU compiler's bidirectional windowed matmuls step by 2)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if m:
        return int(m.group(1))
    by_name = {ins["name"]: ins for ins in cond}
    bound, counter = None, None
    for ins in cond:
        called = re.findall(r"calls=%([\w.\-]+)", ins["attrs"])
        lt = ("direction=LT" in ins["attrs"] if ins["op"] == "compare" else
              any("direction=LT" in i["attrs"] for c in called for i in comps.get(c, [])
                  if i["op"] == "compare"))
        if not lt:
            continue
        for a in _args(ins):
            src = _through(a, by_name)
            if _const(src) is not None and bound is None:
                bound = _const(src)
            elif _tuple_index(src) is not None:
                counter = _tuple_index(src)
        if bound is not None:
            break
    if bound is None:
        return None
    start, step = 0, 1
    if counter is not None and body:
        body_by_name = {ins["name"]: ins for ins in body}
        root = body[-1]
        if root["op"] == "tuple" and counter < len(_args(root)):
            nxt = _through(_args(root)[counter], body_by_name)
            called = re.search(r"calls=%([\w.\-]+)", nxt["attrs"]) if nxt is not None else None
            wrapped = (nxt is not None and nxt["op"] == "fusion" and called is not None
                       and comps.get(called.group(1), [{}])[-1].get("op") == "add")
            if nxt is not None and (nxt["op"] == "add" or wrapped):  # a fusion of one add too
                srcs = [_through(a, body_by_name) for a in _args(nxt)]
                if any(_tuple_index(x) == counter for x in srcs):
                    steps = [_const(x) for x in srcs if _const(x) is not None]
                    step = steps[0] if steps and steps[0] > 0 else 1
    if counter is not None and init is not None and caller is not None:
        tup = _through(init, caller)
        if tup is not None and tup["op"] == "tuple" and counter < len(_args(tup)):
            first = _const(_through(_args(tup)[counter], caller))
            start = first if first is not None else 0
    return max(0, -(-(bound - start) // step))


@functools.cache
def _window_pairs(size: int, window: int, stride: int, lo: int, lhs_dilate: int,
                  rhs_dilate: int, out: int) -> int:
    """Pairs (output position, window position) of one spatial dimension that read a real input
    element (not padding, not a hole of the input dilation)."""
    length = (size - 1) * lhs_dilate + 1
    pairs = 0
    for k in range(window):
        c = k * rhs_dilate - lo
        # output positions p with 0 <= p*stride + c < length
        first = -(c // stride) if c < 0 else 0  # ceil(-c / stride)
        last = min(out - 1, (length - 1 - c) // stride) if length - 1 - c >= 0 else -1
        if last < first:
            continue
        pairs += _count_congruent(first, last, stride, -c, lhs_dilate)
    return pairs


def _count_congruent(first: int, last: int, a: int, b: int, m: int) -> int:
    """How many integers q in [first, last] have a*q = b (mod m)."""
    if last < first:
        return 0
    if m == 1:
        return last - first + 1
    g = math.gcd(a, m)
    if b % g:
        return 0
    mm = m // g
    q0 = (b // g) * pow(a // g, -1, mm) % mm if mm > 1 else 0
    # q = q0 + j*mm within [first, last]
    lo = first + (q0 - first) % mm
    return 0 if lo > last else (last - lo) // mm + 1


def _conv_macs(lhs, rhs, out, attrs: str) -> float | None:
    """Multiply-adds of an HLO convolution (XLA writes batched and plain matmuls as these,
    with windows, padding and dilations standing for batch dimensions)."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if lhs is None or rhs is None or m is None:
        return None
    ll, rl, ol = m.groups()
    w = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in w.group(1).split()) if w else {}
    spatial = sorted(ch for ch in ll if ch.isdigit())
    nd = len(spatial)

    def per_dim(key, default):
        if key not in fields:
            return [default] * nd
        return [int(x) for x in fields[key].split("x")]

    sizes, strides = per_dim("size", 1), per_dim("stride", 1)
    lhs_d, rhs_d = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = ([tuple(int(v) for v in x.split("_")) for x in fields["pad"].split("x")]
            if "pad" in fields else [(0, 0)] * nd)
    pairs = 1
    for j, ch in enumerate(spatial):
        pairs *= _window_pairs(lhs[ll.index(ch)], sizes[j], strides[j], pads[j][0], lhs_d[j],
                               rhs_d[j], out[ol.index(ch)])
    g = re.search(r"batch_group_count=(\d+)", attrs)
    batch = lhs[ll.index("b")] // (int(g.group(1)) if g else 1)
    return float(batch) * rhs[rl.index("o")] * rhs[rl.index("i")] * pairs


def hlo_matmul_flops(hlo_text: str) -> tuple[float, int]:
    """``(matmul FLOPs, loops whose trip count was not found)`` of an optimised HLO module.

    Every ``while`` body counts as many times as its trip count (:func:`_trip_count`: from
    ``counter < N``, the counter's start and step; loops of another form count once and are
    reported);
    fusions, calls and conditionals (costliest branch) are followed.
    """
    comps, entry = _parse(hlo_text)
    memo: dict[str, tuple[float, int]] = {}

    def cost(name: str) -> tuple[float, int]:
        if name in memo:
            return memo[name]
        memo[name] = (0.0, 0)  # cycles (none in HLO) end here
        shapes = {ins["name"]: _dims(ins["type"]) for ins in comps.get(name, [])}
        by_name = {ins["name"]: ins for ins in comps.get(name, [])}
        total, unknown = 0.0, 0
        for ins in comps.get(name, []):
            op, attrs = ins["op"], ins["attrs"]
            out = _dims(ins["type"])
            args = [a.strip().lstrip("%") for a in ins["args"].split(",") if a.strip()]
            if op == "dot" and out is not None:
                lhs = shapes.get(args[0]) if args else None
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
                if lhs is not None and m is not None:
                    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
                    total += 2.0 * math.prod(out) * k
            elif op == "convolution" and out is not None and len(args) >= 2:
                macs = _conv_macs(shapes.get(args[0]), shapes.get(args[1]), out, attrs)
                if macs is not None:
                    total += 2.0 * macs
            elif op == "while":
                body = re.search(r"body=%([\w.\-]+)", attrs)
                cond = re.search(r"condition=%([\w.\-]+)", attrs)
                trips = _trip_count(attrs, comps.get(cond.group(1), []) if cond else [], comps,
                                    body=comps.get(body.group(1)) if body else None,
                                    init=args[0] if args else None, caller=by_name)
                if trips is None:
                    unknown, trips = unknown + 1, 1
                if body:
                    f, u = cost(body.group(1))
                    total, unknown = total + trips * f, unknown + trips * u
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
                names = [b.strip().lstrip("%") for b in m.group(1).split(",")] if m else []
                best = max((cost(b) for b in names), default=(0.0, 0))
                total, unknown = total + best[0], unknown + best[1]
            else:
                for ref in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs):
                    if op in ("reduce", "reduce-window", "scatter", "select-and-scatter",
                              "sort", "map", "all-reduce", "reduce-scatter"):
                        continue  # per-element reducers
                    f, u = cost(ref)
                    total, unknown = total + f, unknown + u
        memo[name] = (total, unknown)
        return memo[name]

    if entry is None:
        raise ValueError("hlo_text has no ENTRY computation")
    return cost(entry)
