"""Which files of a model folder or repo are its checkpoint: one rule, by file name, for every step.

Download, metadata, split, pull and verify's reference must read the same tensors, or a plan made from one set
of files is checked against another. A repo often holds the weights twice: Mistral ships its own
``consolidated.safetensors`` next to the transformers ``model.safetensors`` (different tensor names, same
weights), Meta puts the original checkpoint under ``original/``, and some repos keep a stray copy in another
dtype next to an index of shards. The order, first match wins:

  1. ``model.safetensors.index.json``: exactly the shards its ``weight_map`` names;
  2. ``model.safetensors``;
  3. the other top-level ``*.safetensors``, never ``consolidated*.safetensors``;
  4. the same for torch pickles: ``pytorch_model.bin.index.json``'s shards, ``pytorch_model.bin``, other
     ``.bin``/``.pth``/``.pt`` (not training state such as ``optimizer.pt``).

Files in subfolders are never weights. Everything else that looks like weights is *ignored* and reported, so
a user sees which copy was left out. (A second copy among the files of rule 3 is found from the headers by
`williw.checkpoint.checkpoint_files`; names alone cannot tell.)
"""

from __future__ import annotations

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pth", ".pt")
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")
MISTRAL_NATIVE = "consolidated"


def is_weights_name(name: str) -> bool:
    """A top-level file name that holds tensors (safetensors or a torch pickle that is not training state)."""
    return name.endswith(".safetensors") or (name.endswith(TORCH_SUFFIXES) and not name.startswith(NOT_WEIGHTS))


def select_weight_files(names: list[str] | set[str] | tuple[str, ...],
                        index_files: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Split a folder's file names into the checkpoint's weight files and the ignored weight-like files.

    Args:
        names: the file names (paths relative to the folder; those with a '/' are in subfolders).
        index_files: the files named by the index's ``weight_map`` when an index is among ``names`` (None when
            unknown: then every top-level file of that format stands in for them).

    Returns:
        ``(chosen, ignored)``, each sorted. ``chosen`` is empty when the folder has no weights; ``ignored`` lists
        top-level weight-like files not chosen and every weight-like file in a subfolder.
    """
    top = sorted(n for n in names if "/" not in n)
    nested = sorted(n for n in names if "/" in n and is_weights_name(n.rsplit("/", 1)[1]))
    safetensors = [n for n in top if n.endswith(".safetensors")]
    torch_files = [n for n in top if n.endswith(TORCH_SUFFIXES) and not n.startswith(NOT_WEIGHTS)]
    chosen: list[str] = []
    for index, single, files in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, safetensors),
                                 (TORCH_INDEX, TORCH_SINGLE, torch_files)):
        if index in top:
            chosen = [n for n in files if index_files is None or n in index_files]
        elif single in top:
            chosen = [single]
        else:
            chosen = [n for n in files if not n.startswith(MISTRAL_NATIVE)]
        if chosen:
            break
    ignored = [n for n in safetensors + torch_files if n not in chosen] + nested
    return chosen, ignored
