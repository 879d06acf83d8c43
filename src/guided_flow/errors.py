"""The project's own error types: each names the file, option or value that is wrong."""


def one_line(err: BaseException) -> str:
    """An exception's message with its whitespace (newlines, tabs) collapsed."""
    return " ".join(str(err).split())


class GuidedFlowError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(GuidedFlowError, ValueError):
    """An option has a value outside its allowed range."""


class DataError(GuidedFlowError):
    """A dataset file is missing, unreadable or malformed (the message names file and line)."""


class CacheError(DataError):
    """An HDF5 cache is truncated, foreign or out of date."""


class WeightsError(GuidedFlowError):
    """Backbone weights cannot be loaded (the message names the alternatives)."""


class MatchFailure(GuidedFlowError):
    """A pair that could not be matched, as :meth:`GuidedSemanticFlow.match_many` yields it in
    place of its result: ``index`` is the pair's 0-based position among the pairs, the message
    the one-line reason (naming the file), and ``__cause__`` the original error."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
