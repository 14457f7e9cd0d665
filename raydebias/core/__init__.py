"""The engine's core: what a stage returns (:class:`StageResult`), what it is given (:class:`RunContext`), the
stage and method declarations and their registry (:mod:`raydebias.core.registry`). It imports no stage or
method, so every stage module can import it and the pipeline can import every method without an import circle."""

from raydebias.core.context import RunContext, StageResult
from raydebias.core.registry import (
    Method,
    Ref,
    Stage,
    SyntheticSet,
    config_key,
    get_method,
    ref,
    register,
    registered,
    toposort,
)

__all__ = ["Method", "Ref", "RunContext", "Stage", "StageResult", "SyntheticSet", "config_key", "get_method", "ref",
           "register", "registered", "toposort"]
