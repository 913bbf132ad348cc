"""The fleet: the nodes a model is planned over, and the nodes file (JSON or YAML) they come from.

Units: ``memory_gb`` is decimal gigabytes (1 GB = 1e9 bytes, like disk and GPU spec sheets: an "80 GB" A100 has
80e9 bytes, not 80 GiB), ``compute_tflops`` is 1e12 FLOP/s, ``memory_bandwidth_gbps`` and ``network_gbps`` are
gigabytes per second (1e9 bytes/s; GPU spec sheets give memory bandwidth in GB/s, e.g. 2,039 GB/s for an A100).

A nodes file is a list of objects, or ``{"nodes": [...]}``::

    [{"node_id": "gpu-a", "compute_tflops": 312, "memory_gb": 80, "memory_bandwidth_gbps": 2039}, ...]

or, for pairs of nodes whose link differs from their own links, ``{"nodes": [...], "links": [...]}``::

    "links": [{"between": ["gpu-a", "gpu-b"], "network_gbps": 0.1, "latency_ms": 20}, ...]

A link is symmetric and gives at least one of ``network_gbps`` and ``latency_ms``; a field it leaves out is taken
from each end's own link (`williw.planner.costs.transfer_time`).

What a node runs its stages in (`williw.precision`): ``device`` (``cpu``, ``cuda``, ``mps``), the compute ``dtype``
(``float32``, ``bfloat16``, ``float16``) and the ``weights`` formats it accepts (a list of ``as-stored``, ``int8``,
``int4``, kept highest precision first), e.g. ``"device": "cuda", "dtype": "bfloat16", "weights": ["int8"]``.
A node that gives none of them is a CPU node at float32 with its weights as stored (every node before these).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.devices import check_device, check_dtype, check_weights, format_conflict
from williw.errors import NodesError

GB = 1e9  # bytes per GB (decimal, see the module docstring)
TFLOPS_IN_GFLOPS = 1000.0

# Node ids become folder names (one shard folder per node), so: no separators, no "." or "..", and no "@",
# which the plan JSON reserves for its "@plan" key.
NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# Every number of a node lies in the closed interval [NUMBER_MIN, NUMBER_MAX]: 1e-6 TFLOPS is a 1 MFLOP/s
# microcontroller, 1e9 GB an exabyte; beyond them the planner's products and quotients (bytes / GB/s,
# GFLOPs / TFLOPS, sums over 10^5 tensors) would leave float64's range (5e-324 TFLOPS made stage times inf and
# plan JSON NaN; 1e308 GB overflowed `memory_bytes`). Inside them every plan number is finite.
# memory_gb may go down to 1e-9 (one byte): planner tests and examples use fleets of a few bytes.
NUMBER_MIN = 1e-6
NUMBER_MAX = 1e9
RANGES = {"compute_tflops": (1e-6, "1e-6"), "memory_gb": (1e-9, "1e-9"), "memory_bandwidth_gbps": (1e-6, "1e-6"),
          "network_gbps": (1e-6, "1e-6"), "latency_ms": (0, "0"), "memory_reserve_gb": (0, "0")}

_REQUIRED = ("node_id", "compute_tflops", "memory_gb")
_OPTIONAL_NUMBERS = ("memory_bandwidth_gbps", "network_gbps", "latency_ms", "memory_reserve_gb")
_FIELDS = (*_REQUIRED, *_OPTIONAL_NUMBERS, "labels", "device", "dtype", "weights")
_RUNS_IN = {"device": "cpu", "dtype": "float32", "weights": ("as-stored",)}  # the defaults: written only if other
_LINK_FIELDS = ("between", "network_gbps", "latency_ms")
_FILE_FIELDS = ("nodes", "links")
_REPR = reprlib.Repr()  # a message's sketch of a container, bounded whatever its size (keywords need Python 3.12)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4


@dataclass(frozen=True)
class Node:
    """One machine that will hold a shard.

    Attributes:
        node_id: matches `NODE_ID_RE`; used as a folder name.
        compute_tflops: sustained dense compute, 1e12 FLOP/s.
        memory_gb: memory for weights, 1 GB = 1e9 bytes.
        memory_bandwidth_gbps: memory bandwidth in GB/s (1e9 bytes/s); prices token-by-token decoding.
        network_gbps: link speed in GB/s (1e9 bytes/s); prices the hidden state a stage receives and sends
            (`williw.planner.costs`); None: transfers are free.
        labels: free-form tags.
        latency_ms: one-way latency between the node and the network, milliseconds; every transfer the node
            takes part in pays it once.
        memory_reserve_gb: memory kept free for the runtime (CUDA context, allocator slack), GB; the planner fits
            weights, KV cache and activations into ``memory_gb - memory_reserve_gb``.
        device: ``cpu``, ``cuda`` or ``mps`` (`williw.devices.DEVICE_KINDS`): the kind of device it computes on.
        dtype: the compute dtype of its stages (`williw.precision.DTYPES`).
        weights: the weight formats it accepts (`williw.precision.WEIGHTS`), highest precision first.
    """

    node_id: str
    compute_tflops: float
    memory_gb: float
    memory_bandwidth_gbps: float | None = None
    network_gbps: float | None = None
    labels: tuple[str, ...] = ()
    latency_ms: float | None = None
    memory_reserve_gb: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    weights: tuple[str, ...] = ("as-stored",)

    @property
    def memory_bytes(self) -> int:
        """Memory in bytes: ``memory_gb · 1e9`` rounded to the nearest byte (0.29 · 1e9 is 289999999.99999994)."""
        return round(self.memory_gb * GB)

    @property
    def reserve_bytes(self) -> int:
        """``memory_reserve_gb · 1e9`` rounded to the byte (0 when not given)."""
        return round((self.memory_reserve_gb or 0.0) * GB)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node_id": self.node_id, "compute_tflops": self.compute_tflops,
                             "memory_gb": self.memory_gb}
        for key in _OPTIONAL_NUMBERS:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.labels:
            d["labels"] = list(self.labels)
        for key, default in _RUNS_IN.items():
            if getattr(self, key) != default:
                d[key] = list(self.weights) if key == "weights" else getattr(self, key)
        return d


@dataclass(frozen=True)
class Link:
    """The link between two nodes, when it differs from their own links (symmetric).

    Attributes:
        between: the two node ids, in file order.
        network_gbps: GB/s (1e9 bytes/s) of the pair's link; None: each end uses its own ``network_gbps``.
        latency_ms: one-way latency of the pair's link, milliseconds; None: each end uses its own ``latency_ms``.
    """

    between: tuple[str, str]
    network_gbps: float | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"between": list(self.between)}
        for key in ("network_gbps", "latency_ms"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class Fleet:
    """The nodes of a nodes file and its link table (empty when the file gives none)."""

    nodes: tuple[Node, ...]
    links: tuple[Link, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"nodes": [v.to_dict() for v in self.nodes]}
        if self.links:
            d["links"] = [x.to_dict() for x in self.links]
        return d


def link_table(links: Sequence[Link]) -> dict[tuple[str, str], Link]:
    """Each link under both orders of its pair: ``table[(a, b)] is table[(b, a)]``."""
    table: dict[tuple[str, str], Link] = {}
    for x in links:
        a, b = x.between
        table[a, b] = table[b, a] = x
    return table


def check_node_id(node_id: Any, where: str) -> str:
    """Return ``node_id`` if it can be a node id (and so a folder name).

    Args:
        node_id: the candidate.
        where: what the message names, e.g. ``"'nodes.json': entry 3"``.

    Raises:
        NodesError: not a string of 1-64 characters from ``A-Z a-z 0-9 . _ -``, or "." or "..".
    """
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id) or node_id in (".", ".."):
        raise NodesError(f"{where}: node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or "
                         f"'..'), got {node_id!r}")
    return node_id


def _number(entry: dict[str, Any], key: str, where: str, *, optional: bool) -> float | None:
    value = entry.get(key)
    if value is None:
        if optional:
            return None
        raise NodesError(f"{where}: missing field '{key}'")
    try:
        return check_number(key, value)
    except ValueError as exc:
        raise NodesError(f"{where}: field '{key}' {exc}") from None


def check_number(field: str, value: Any) -> float:
    """``value`` as a float if it is a number in the field's range: [1e-6, 1e9] (`RANGES`; memory from 1e-9, latency
    and reserve from 0).

    Raises:
        ValueError: ``"must be a finite number in [1e-6, 1e9], got <value>"``.
    """
    low, text = RANGES[field]
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            isinstance(value, int) and low <= value <= NUMBER_MAX
            or isinstance(value, float) and math.isfinite(value) and low <= value <= NUMBER_MAX):
        raise ValueError(f"must be a finite number in [{text}, 1e9], got {_short(value)}")
    return float(value)


def _runs_in(entry: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, check in (("device", check_device), ("dtype", check_dtype), ("weights", check_weights)):
        if entry.get(key) is not None:  # as for the numbers: YAML's "device:" (null) is not given
            try:
                out[key] = check(entry[key])
            except ValueError as exc:
                raise NodesError(f"{where}: field '{key}' {exc}") from None
    device, dtype = out.get("device", "cpu"), out.get("dtype", "float32")
    why = format_conflict(device, dtype, out.get("weights", ("as-stored",)))
    if why:  # as `williw node` and the worker refuse it
        raise NodesError(f"{where}: field 'weights' cannot run on device {device} at {dtype}: {why}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, list | dict):  # YAML aliases make a 400-byte file a list of 9^8 items (repr: 8 s, 500 MB)
        return _REPR.repr(value)
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text):,} characters)"


def parse_nodes(obj: Any, source: str = "nodes") -> list[Node]:
    """Validate a list of node objects (as loaded from JSON or YAML); a link table, if any, is checked too
    (`parse_fleet`) but not returned.

    Args:
        obj: a list of dicts, or a dict with a ``nodes`` list (and optionally ``links``).
        source: the file name for messages.

    Returns:
        The nodes, in file order.

    Raises:
        NodesError: one line naming ``source``, the entry (index and node id) and the field.
    """
    return list(parse_fleet(obj, source).nodes)


def parse_fleet(obj: Any, source: str = "nodes") -> Fleet:
    """Validate a fleet: a list of node objects, or ``{"nodes": [...], "links": [...]}``.

    Args:
        obj: as loaded from JSON or YAML.
        source: the file name for messages.

    Returns:
        The nodes in file order and the links in file order.

    Raises:
        NodesError: one line naming ``source``, the entry or link (index, node id or pair) and the field; for
            links: an unknown node id, a node linked to itself, a pair listed twice, neither number given, or a
            number out of range.
    """
    links: Any = None
    if isinstance(obj, dict) and "nodes" in obj:
        unknown = sorted(set(obj) - set(_FILE_FIELDS), key=str)
        if unknown:
            raise NodesError(f"'{source}': unknown field {str(unknown[0])!r} (fields: {', '.join(_FILE_FIELDS)})")
        obj, links = obj["nodes"], obj.get("links")
    nodes = _parse_node_list(obj, source)
    return Fleet(tuple(nodes), _parse_links(links, {v.node_id for v in nodes}, source))


def _parse_node_list(obj: Any, source: str) -> list[Node]:
    if not isinstance(obj, list) or not obj:
        got = type(obj).__name__ if obj else repr(obj)
        raise NodesError(f"'{source}': expected a non-empty list of nodes (or {{\"nodes\": [...]}}), got {got}")
    nodes: list[Node] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(obj):
        where = f"'{source}': entry {i}"
        if not isinstance(entry, dict):
            raise NodesError(f"{where}: expected an object with node_id, compute_tflops, memory_gb, "
                             f"got {_short(entry)}")
        node_id = check_node_id(entry.get("node_id"), where)
        where = f"{where} (node '{node_id}')"
        unknown = sorted(set(entry) - set(_FIELDS), key=str)  # YAML keys may be ints: 1 < "x" is a TypeError
        if unknown:
            raise NodesError(f"{where}: unknown field {str(unknown[0])!r} (fields: {', '.join(_FIELDS)})")
        if node_id in seen:
            raise NodesError(f"{where}: duplicate node_id, already used by entry {seen[node_id]}")
        seen[node_id] = i
        labels = entry.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise NodesError(f"{where}: field 'labels' must be a list of strings, got {_short(labels)}")
        nodes.append(Node(node_id=node_id,
                          compute_tflops=_number(entry, "compute_tflops", where, optional=False),  # type: ignore
                          memory_gb=_number(entry, "memory_gb", where, optional=False),  # type: ignore[arg-type]
                          memory_bandwidth_gbps=_number(entry, "memory_bandwidth_gbps", where, optional=True),
                          network_gbps=_number(entry, "network_gbps", where, optional=True),
                          labels=tuple(labels), latency_ms=_number(entry, "latency_ms", where, optional=True),
                          memory_reserve_gb=_number(entry, "memory_reserve_gb", where, optional=True),
                          **_runs_in(entry, where)))
    return nodes


def _parse_links(obj: Any, ids: set[str], source: str) -> tuple[Link, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise NodesError(f"'{source}': field 'links' must be a list of {{\"between\": [node_id, node_id], "
                         f"\"network_gbps\": ..., \"latency_ms\": ...}}, got {_short(obj)}")
    out: list[Link] = []
    seen: dict[frozenset[str], int] = {}
    for i, entry in enumerate(obj):
        where = f"'{source}': link {i}"
        if not isinstance(entry, dict):
            raise NodesError(f"{where}: expected an object with between and network_gbps or latency_ms, "
                             f"got {_short(entry)}")
        unknown = sorted(set(entry) - set(_LINK_FIELDS), key=str)
        if unknown:
            raise NodesError(f"{where}: unknown field {str(unknown[0])!r} (fields: {', '.join(_LINK_FIELDS)})")
        pair = entry.get("between")
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise NodesError(f"{where}: field 'between' must be a list of two node ids, got {_short(pair)}")
        for x in pair:
            if x not in ids:
                raise NodesError(f"{where}: field 'between' names {_short(x)}, which is not a node of the file")
        if pair[0] == pair[1]:
            raise NodesError(f"{where}: field 'between' links node '{pair[0]}' to itself")
        where = f"{where} ('{pair[0]}'-'{pair[1]}')"
        key = frozenset(pair)
        if key in seen:
            raise NodesError(f"{where}: the pair is already listed by link {seen[key]}")
        seen[key] = i
        if entry.get("network_gbps") is None and entry.get("latency_ms") is None:
            raise NodesError(f"{where}: give network_gbps, latency_ms or both")
        out.append(Link((pair[0], pair[1]), _number(entry, "network_gbps", where, optional=True),
                        _number(entry, "latency_ms", where, optional=True)))
    return tuple(out)


def load_nodes(path: str | os.PathLike[str], *, refuse_links: str | None = None) -> list[Node]:
    """Read a nodes file: JSON, or YAML when the name ends in ``.yaml``/``.yml`` (its links checked, not returned).

    Args:
        refuse_links: the command reading the file, when it cannot price a link table: a file with links is then
            refused rather than planned as if its links were not there.

    Raises:
        NodesError: missing or unparsable file, a bad entry (see `parse_nodes`), or links refused.
    """
    fleet = load_fleet(path)
    if refuse_links and fleet.links:
        count = f"{len(fleet.links)} {'entry' if len(fleet.links) == 1 else 'entries'}"
        raise NodesError(f"'{path}': {refuse_links} does not price a link table ('links', {count}), only "
                         f"`williw plan` does: remove 'links' to use each node's own link")
    return list(fleet.nodes)


def load_fleet(path: str | os.PathLike[str]) -> Fleet:
    """Read a nodes file with its link table (`parse_fleet`): JSON, or YAML for ``.yaml``/``.yml``.

    Raises:
        NodesError: missing or unparsable file, a bad entry or a bad link.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NodesError(f"'{path}': no such nodes file") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise NodesError(f"'{path}': cannot read the nodes file ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        # PyYAML composes recursively: ~1,000 nested "[" raised RecursionError as a traceback; the JSON reader's
        # depth limit (`jsonio.MAX_DEPTH`) holds for YAML too, so no later walk or repr recurses deeper.
        try:
            data = yaml.safe_load(text)
            deep = not jsonio.depth_ok(data, jsonio.MAX_DEPTH)
        except yaml.YAMLError as exc:
            raise NodesError(f"'{path}': not valid YAML ({' '.join(str(exc).split())})") from None
        except RecursionError:
            deep = True
        if deep:
            raise NodesError(f"'{path}': not valid YAML for a nodes file (nested deeper than {jsonio.MAX_DEPTH} "
                             f"levels)")
    else:
        data = jsonio.loads(text, f"'{path}'", NodesError)
    return parse_fleet(data, str(path))
