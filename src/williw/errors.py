"""One exception family for the whole library.

Every error a user can cause is a `WilliwError` whose message is one line naming the file, field or node and
what was expected; the CLI prints `str(error)` and exits 2. Each family also subclasses the builtin a caller
would already catch (``ValueError`` for bad input, ``ImportError`` for a missing extra).
"""

from __future__ import annotations


class WilliwError(Exception):
    """Base class of every error williw raises on purpose."""


class CheckpointError(WilliwError, ValueError):
    """A model folder or checkpoint file is missing, unreadable or corrupt."""


class MetadataError(WilliwError, ValueError):
    """A metadata JSON file does not have the expected fields or values."""


class NodesError(WilliwError, ValueError):
    """A nodes file (the fleet) is malformed."""


class PlanError(WilliwError, ValueError):
    """A plan is malformed or does not fit the model or the nodes."""


class InfeasiblePlan(PlanError):
    """No plan satisfies the constraints; the message says which one fails and by how much."""


class SplitError(WilliwError):
    """Writing or checking shards failed."""


class HubError(WilliwError):
    """The Hugging Face Hub (or a server speaking its protocol) refused or failed a request."""


class WorkerError(WilliwError):
    """The worker service answered with an error."""


class VerifyError(WilliwError):
    """The shards do not compute the same model, or cannot be checked."""


class GenerateError(WilliwError):
    """Running the placed model failed: a node did not answer, refused a session, or the pipeline is not ready."""


class GenerationInputError(WilliwError, ValueError):
    """The caller asked for a generation that cannot run as asked; the API answers it 400.

    Attributes:
        param: the field at fault, as OpenAI names it (``prompt``, ``messages.[0].content``), or None.
        code: OpenAI's error code (``context_length_exceeded``, ``invalid_value``), or None.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class DeviceError(WilliwError, ValueError):
    """A node asked for a device, dtype or weight format this machine (or its torch) cannot run."""


class MissingDependency(WilliwError, ImportError):
    """An optional extra (torch, transformers) is needed for this operation but not installed."""


def require_torch(what: str) -> None:
    """Raise `MissingDependency` unless torch can be imported.

    Args:
        what: the operation that needs torch, for the message.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise MissingDependency(f"{what} needs torch: install it with  pip install 'williw[torch]'")
