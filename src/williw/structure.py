"""The model's structure: its stacks of blocks in execution order, read from ``config.json`` and checked against the
tensor names.

The config says which stacks a model has and how many blocks each holds (transformers' own configs:
``vision_config.depth``/``num_hidden_layers`` for a vision tower, ``num_layers``/``num_decoder_layers`` (T5) or
``encoder_layers``/``decoder_layers`` (BART, Whisper) for an encoder-decoder, ``num_hidden_layers`` or
``text_config.num_hidden_layers`` for the language model, ``num_nextn_predict_layers`` for DeepSeek's
multi-token-prediction layers). Tensor names are used only to find which numbered module path carries each
stack (``model.visual.blocks``, ``encoder.block``, ``model.layers``), and the count found is always checked
against the config: a disagreement nothing explains is a `CheckpointError`, never a plan.

The execution order is vision tower → language model, encoder → decoder. The pipeline is the chain of every
stack's blocks in that order; a block's *chain index* is its position in it. Tensors outside the stacks are
``first`` (embeddings, and modules that map the token table's width to the hidden size, such as OPT's
``project_in``: they run before the first stack), ``between`` (a module that runs between two stacks, such as a
vision merger or an encoder's final norm: it travels with the neighbouring block), ``last`` (final norm, heads), or
``mtp`` (multi-token-prediction layers, not in the forward pass: they travel with the last stage).
Without a config the stack is guessed from names alone (`williw.classify.find_block_prefix`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from williw.classify import find_block_prefix, is_embedding_side, layer_type, leftmost_index, table_kind
from williw.config import parse_config
from williw.errors import CheckpointError

ROLES = ("first", "block", "between", "last", "mtp")


@dataclass(frozen=True)
class Stack:
    """One stack of blocks. ``start`` is the chain index of its block 0; its blocks are ``[start, start + layers)``."""

    part: str  # vision, encoder, decoder, language (or blocks, when guessed without a config)
    prefix: str  # module path of the numbered blocks, e.g. "model.visual.blocks"
    layers: int
    config_key: str | None  # the config field that gave ``layers``; None when guessed from names
    start: int
    layer_types: tuple[str, ...] | None = None  # config ``layer_types``: full_attention, sliding_attention, ...

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"part": self.part, "prefix": self.prefix, "layers": self.layers,
                             "config_key": self.config_key, "start": self.start}
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        return d


@dataclass(frozen=True)
class Place:
    """Where one tensor runs: ``block`` is its chain index (also set for ``between`` modules, which travel with
    that block); ``stack``/``index`` name the stack and the index within it for blocks."""

    role: str
    block: int | None
    stack: str | None
    index: int | None


@dataclass(frozen=True)
class Structure:
    stacks: tuple[Stack, ...]  # in execution order
    mtp_prefix: str | None  # the stack whose indices past its count are multi-token-prediction layers
    mtp_layers: int
    inputs: tuple[str, ...] = ()  # modules, not embeddings, that run before the first stack (`input_projections`)

    @property
    def blocks(self) -> int:
        return sum(s.layers for s in self.stacks)

    def place(self, name: str) -> Place:
        """Where ``name`` runs in the forward pass (see the module docstring)."""
        for s in self.stacks:
            if not name.startswith(s.prefix + "."):
                continue
            head, _, tail = name[len(s.prefix) + 1:].partition(".")
            if head.isdigit() and tail:
                i = int(head)
                if i >= s.layers:
                    return Place("mtp", None, s.part, i)
                return Place("block", s.start + i, s.part, i)
        if (is_embedding_side(name) and layer_type(name) != "lm_head") or name.rpartition(".")[0] in self.inputs:
            return Place("first", None, None, None)  # input embeddings: computed from the ids the first stage has
        for k, s in enumerate(self.stacks):
            root = _root(s)
            if not root or not name.startswith(root + "."):
                continue
            before = _is_input_side(name[len(root) + 1:])
            if before and k == 0:
                return Place("first", None, None, None)
            if not before and k == len(self.stacks) - 1:
                return Place("last", None, None, None)
            block = s.start if before else s.start + s.layers - 1
            return Place("between", block, s.part, None)
        vision = next((s for s in self.stacks[:-1] if s.part == "vision"), None)
        if vision and any(w in name.split(".") for w in _PROJECTORS):
            return Place("between", vision.start + vision.layers - 1, vision.part, None)
        return Place("last", None, None, None)


_VISION_WORDS = ("visual", "vision", "vision_tower", "vision_model")
_PART_WORDS = {"vision": _VISION_WORDS, "encoder": ("encoder",), "decoder": ("decoder",)}
# Modules that carry a vision tower's output into the language model (Llava, Qwen2-VL, DeepSeek-VL, Idefics).
_PROJECTORS = ("multi_modal_projector", "mm_projector", "projector", "connector", "merger", "aligner")


def _root(stack: Stack) -> str:
    """The module that owns a stack: the first path component naming its part (``vision_tower`` in
    ``vision_tower.vision_model.encoder.layers``), else the stack's parent module (``model`` of ``model.layers``)."""
    parts = stack.prefix.split(".")
    for i, part in enumerate(parts[:-1]):
        if any(w in part for w in _PART_WORDS.get(stack.part, ())):
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1])


def _is_input_side(rest: str) -> bool:
    # Modules of a stack's own input that are not embeddings: Whisper's conv stem, BART's embedding norm, CLIP's
    # norm before its first layer (spelled "pre_layrnorm" in transformers), at any depth under the stack's owner
    # (``vision_tower.pre_layrnorm`` or, as transformers 5.0 saves Llava, ``vision_tower.vision_model.pre_layrnorm``).
    return any(p in _INPUT_SIDE for p in rest.split(".")[:-1])


_INPUT_SIDE = ("conv1", "conv2", "rotary_pos_emb", "layernorm_embedding", "pre_layrnorm", "pre_layernorm", "ln_pre")


@dataclass(frozen=True)
class _Want:
    part: str
    layers: int | None
    key: str | None
    words: tuple[str, ...]  # a module path with one of these components carries this part


def _count(cfg: dict[str, Any], *keys: str) -> tuple[int | None, str | None]:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, key
    return None, None


def wanted_stacks(cfg: dict[str, Any]) -> list[_Want]:
    """The stacks a config declares, in execution order, with their block counts and the keys that gave them."""
    wants: list[_Want] = []
    vision = cfg.get("vision_config")
    if isinstance(vision, dict):
        n, key = _count(vision, "depth", "num_hidden_layers", "num_layers")
        wants.append(_Want("vision", n, f"vision_config.{key}" if key else None, ("visual", "vision", "vision_tower",
                                                                                   "vision_model")))
    if cfg.get("is_encoder_decoder") or "encoder_layers" in cfg or "num_decoder_layers" in cfg:
        enc, enc_key = _count(cfg, "encoder_layers", "num_layers")
        dec, dec_key = _count(cfg, "decoder_layers", "num_decoder_layers", "num_layers")
        wants.append(_Want("encoder", enc, enc_key, ("encoder",)))
        wants.append(_Want("decoder", dec, dec_key, ("decoder",)))
        return wants
    text = cfg.get("text_config")
    if isinstance(text, dict):
        n, key = _count(text, "num_hidden_layers", "num_layers", "n_layer")
        if key:
            wants.append(_Want("language", n, f"text_config.{key}", ()))
            return wants
    n, key = _count(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    wants.append(_Want("language", n, key, ()))
    return wants


def _numbered(names: Iterable[str]) -> dict[str, set[int]]:
    found: dict[str, set[int]] = defaultdict(set)
    for name in names:
        hit = leftmost_index(name)
        if hit:
            found[hit[0]].add(hit[1])
    return found


def find_structure(names: Iterable[str], cfg: dict[str, Any] | None, source: str = "config.json",
                   shapes: Mapping[str, tuple[int, ...]] | None = None) -> Structure:
    """The stacks of a checkpoint in execution order, each checked against the config's layer count.

    Args:
        names: every tensor name of the checkpoint.
        cfg: the loaded ``config.json`` (None: guess one stack from the names).
        source: the config's path, for messages.
        shapes: every tensor's shape, from the headers: with them, modules that map the token table's width to
            the hidden size run first (`input_projections`).

    Raises:
        CheckpointError: one line naming the stack, the config key and both counts when they disagree, or a
            stack the config declares that no numbered module path carries.
    """
    names = list(names)
    numbered = _numbered(names)
    if not cfg:
        return _guessed(names)
    deep = _deep(names, numbered)
    wants = wanted_stacks(cfg)
    claimed: set[str] = set()
    stacks: list[Stack] = []
    mtp_prefix, mtp_layers = None, 0
    start = 0
    for want in wants:
        words = want.words or ()
        candidates = [p for p in numbered if p not in claimed
                      and (any(w in p.split(".") for w in words) if words
                           else not any(w in p.split(".") for w in _VISION_WORDS))]
        if not candidates:
            if want.layers:
                raise CheckpointError(f"'{source}': {want.key} = {want.layers} but no numbered module path in the "
                                      f"checkpoint carries the {want.part} blocks")
            continue
        extra = 0
        if want.part in ("language", "decoder"):
            extra = _count(cfg, "num_nextn_predict_layers")[0] or 0
        fits = {p: want.layers is not None and numbered[p] in (set(range(want.layers)),
                                                             set(range(want.layers + extra))) for p in candidates}
        # The path whose count the config confirms, then one whose entries are blocks (not a Sequential's layers).
        best = max(candidates, key=lambda p: (fits[p], p in deep, len(numbered[p]), -len(p)))
        found = numbered[best]
        layers = want.layers if want.layers is not None else max(found) + 1
        if found not in (set(range(layers)), set(range(layers + extra))):
            have = f"{len(found)} blocks ({min(found)}..{max(found)})"
            mtp = f" (+ {extra} from num_nextn_predict_layers)" if extra else ""
            raise CheckpointError(f"'{source}': {want.key or want.part} = {layers}{mtp} but the checkpoint's "
                                  f"'{best}' has {have}; the {want.part} stack does not match its config")
        if max(found) >= layers:
            mtp_prefix, mtp_layers = best, extra
        claimed.add(best)
        types = _layer_types(cfg, want, layers, source) if want.part in ("language", "decoder") else None
        stacks.append(Stack(want.part, best, layers, want.key, start, types))
        start += layers
    _check_unclaimed(numbered, deep, claimed, source)
    structure = Structure(tuple(stacks), mtp_prefix, mtp_layers)
    return replace(structure, inputs=input_projections(structure, shapes, cfg)) if shapes else structure


def token_table(structure: Structure, shapes: Mapping[str, tuple[int, ...]], cfg: dict[str, Any] | None) -> str | None:
    """The input token table: the embedding that transformers' ``get_input_embeddings()`` returns, which a tied
    output head reuses; None when the checkpoint has no 2-D embedding that runs first.

    A position or token-type table is never it, whatever its shape: GPT-BigCode's ``wpe`` has as many rows as its
    ``wte`` when ``vocab_size == n_positions``, and picking by rows made the position table the head. Among the
    rest, a table with the config's ``vocab_size`` rows comes first, then one named as the families name their
    token table, then the one nearest the root (BART's ``model.shared`` before a decoder's copy)."""
    vocab = parse_config(cfg).vocab_size if cfg else None
    tables = sorted(n for n, s in shapes.items() if len(s) == 2 and layer_type(n) == "embedding"
                    and table_kind(n) != "position" and structure.place(n).role == "first")
    if not tables:
        return None
    return max(tables, key=lambda n: (shapes[n][0] == vocab, table_kind(n) == "token", -n.count(".")))


def input_projections(structure: Structure, shapes: Mapping[str, tuple[int, ...]],
                      cfg: dict[str, Any] | None) -> tuple[str, ...]:
    """Modules outside the embeddings that run before the first block: those whose weight maps the token table's
    width to the hidden size (``[hidden_size, width]``), as OPT's ``project_in`` does when ``word_embed_proj_dim``
    != ``hidden_size`` (opt-350m: 512 -> 1024). The first block takes hidden-wide states, so a table of another
    width reaches it only through such a map; its name says nothing of when it runs (placed by name, it went last, and
    the first stage lacked it). The map back (``project_out``, ``[width, hidden_size]``) runs after the last block.
    """
    hidden = parse_config(cfg).hidden_size if cfg else None
    table = token_table(structure, shapes, cfg)
    if not isinstance(hidden, int) or table is None or shapes[table][1] == hidden:
        return ()
    wide = (hidden, shapes[table][1])
    return tuple(sorted({n.rpartition(".")[0] for n, s in shapes.items()
                         if tuple(s) == wide and layer_type(n) != "lm_head" and structure.place(n).role == "last"}))


def _deep(names: list[str], numbered: dict[str, set[int]]) -> set[str]:
    """Numbered paths whose entries are modules with submodules (``layers.3.attn.q.weight``): blocks, unlike the
    plain layers of a ``Sequential`` (``merger.mlp.0.weight``)."""
    deep = set()
    for name in names:
        hit = leftmost_index(name)
        if hit and hit[0] not in deep and name[len(hit[0]) + 1:].count(".") >= 2:
            deep.add(hit[0])
    return deep


def _check_unclaimed(numbered: dict[str, set[int]], deep: set[str], claimed: set[str], source: str) -> None:
    """A numbered path of blocks that the config declares no stack for would silently become one lump."""
    for prefix in sorted(deep - claimed):
        if len(numbered[prefix]) >= 2:
            raise CheckpointError(f"'{source}': the checkpoint's '{prefix}' holds {len(numbered[prefix])} numbered "
                                  "blocks but the config declares no stack for them (expected in vision_config, "
                                  "text_config or encoder/decoder layer counts); williw cannot place them")


def _layer_types(cfg: dict[str, Any], want: _Want, layers: int, source: str) -> tuple[str, ...] | None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    types = cfg.get("layer_types", text.get("layer_types"))
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        return None
    if len(types) != layers:
        raise CheckpointError(f"'{source}': layer_types has {len(types)} entries but {want.key} = {layers}")
    return tuple(types)


def _guessed(names: list[str]) -> Structure:
    prefix = find_block_prefix(names)
    if prefix is None:
        return Structure((), None, 0)
    indices = _numbered(names)[prefix]
    return Structure((Stack("blocks", prefix, max(indices) + 1, None, 0),), None, 0)
